"""The stages of a study, in order (each is resumable: its results go to state.json as they come).

- ``data``: checks the dataset is there; renders synthnorb (harness.data.synthnorb) when it is missing.
- ``tune``: one Optuna study per model, the same budget for each (harness/study/tune.py).
- ``train``: each model with its best parameters for the full budget (``run.train.epochs``), keeping a
  checkpoint per epoch for the matched protocol; once per seed when the study lists ``seeds``. An
  interrupted final training resumes from its last completed epoch.
- ``viewpoint``: the matched novel-viewpoint protocol (harness/viewpoint.py) on the final runs, plus the
  error per (azimuth, elevation) cell of the matched checkpoints.
- ``attack``: the adversarial suite (harness.attack.attack_run) on the final models (every seed's).
- ``report``: harness.report.write_report(NAME).

Each stage reports its progress with an estimate of the time left (harness/progress.py).
"""

from __future__ import annotations

import json
import shlex

from harness.progress import Progress
from harness.study.config import model_family, run_config, study_data_folder, study_seeds
from harness.study.state import Study, StudyError
from harness.study.tune import fail_stale_trials, load_optuna, record_best, run_workers


def stage_data(study: Study, parent) -> None:
    from harness import data

    cfg = study.cfg
    root = study_data_folder(cfg)
    try:
        data.get_dataset(cfg.run.data.name, "test", root=root, channels=cfg.run.data.channels)
        study.log(f"data: {cfg.run.data.name} found in {root}")
        if cfg.run.data.name == "synthnorb":
            from harness.data import synthnorb

            made = (synthnorb.read_manifest(root) or {}).get("options", {})
            want = {k: v for k, v in vars(cfg.synthnorb).items() if k in made and made[k] != v}
            if want:
                study.log(
                    f"data: note: {root} was rendered with {made}, the study asks for {want}; "
                    "delete the folder to re-render"
                )
        return
    except data.DataError as e:
        missing = e
    if cfg.run.data.name != "synthnorb":
        if cfg.run.data.name == "smallnorb":
            raise StudyError(
                f"smallNORB is not in {root}: run "
                f"`python -m harness.data download smallnorb --root {shlex.quote(str(root))}` "
                f"(or set CAPSBENCH_DATA), then rerun ({missing})"
            )
        raise StudyError(f"dataset {cfg.run.data.name} is not usable: {missing}")
    from harness.data import synthnorb

    s = cfg.synthnorb
    study.log(
        f"data: rendering synthnorb into {root} ({s.image_size}px, {s.lightings} lightings, "
        f"{s.elevations} elevations, {s.instances} instances)"
    )
    synthnorb.synthesize(
        root, image_size=s.image_size, lightings=s.lightings, elevations=s.elevations, instances=s.instances
    )
    data.get_dataset(cfg.run.data.name, "test", root=root, channels=cfg.run.data.channels)


def stage_tune(study: Study, parent) -> None:
    cfg = study.cfg
    best = dict(study.state()["best_params"])
    pending = [m for m in cfg.models if m not in best]
    if cfg.tune.n_trials == 0:
        study.log("tune: tune.n_trials = 0, training every model with the [run] settings as they are")
        best.update({m: {} for m in pending})
        pending = []
    for model in pending:
        fail_stale_trials(study, load_optuna(study, model))  # logs each trial it fails
    if pending:
        study.log(f"tune: {', '.join(pending)}: {cfg.tune.n_trials} trials each, {study.workers} worker(s)")
        run_workers(study, pending, parent)
    for model in pending:
        best[model] = record_best(study, model, parent)
        study.update_state(best_params=best)
    study.update_state(best_params=best)
    parent.log_json(best, "tune/best_params.json")


def final_run_config(study: Study, model: str, seed: int | None = None):
    cfg = study.cfg
    run = run_config(cfg, model, study.state()["best_params"].get(model, {}))
    if cfg.run.data.view != "none" and "viewpoint" in cfg.stages:
        run.train.save_every = 1  # the matched protocol reloads the checkpoint of any epoch
    if cfg.seeds:  # else the seed of [run] / [per_model] as it is
        run.train.seed = cfg.seeds[0] if seed is None else seed
    run.run_name = f"final · {model}" + (f" · seed {run.train.seed}" if len(cfg.seeds) > 1 else "")
    return run


def final_runs(study: Study) -> list[tuple[str, int, str]]:
    """(model, seed, run id) of every finished final training, in the study's seed and model order."""
    seed_runs = study.state().get("seed_runs", {})
    return [
        (m, s, seed_runs[m][str(s)])
        for s in study_seeds(study.cfg)
        for m in study.cfg.models
        if str(s) in seed_runs.get(m, {})
    ]


def run_label(model: str, seed: int, many_seeds: bool) -> str:
    """How the log names a final run: the model, and its seed when the study has several."""
    return model + (f" seed {seed}" if many_seeds else "")


def stage_train(study: Study, parent) -> None:
    """Each model with its best parameters, once per seed (``seeds``; default one), resumable per run."""
    from harness import tracking

    cfg = study.cfg
    fit_fn = study.fit_function()
    seeds = study_seeds(cfg)
    done = study.state()["seed_runs"]
    todo = [(s, m) for s in seeds for m in cfg.models if str(s) not in done.get(m, {})]
    epochs = {m: final_run_config(study, m).train.epochs for m in cfg.models}
    total = sum(epochs[m] for s in seeds for m in cfg.models)
    bar = Progress(total, "train", "epoch", done=total - sum(epochs[m] for _, m in todo), log=study.log)
    try:
        for seed, model in todo:
            state = study.state()
            run_cfg = final_run_config(study, model, seed)
            tags = {
                **study.run_tags(model, kind="train", role="final"),
                "capsbench.seed": str(run_cfg.train.seed),
            }
            # a final run of this parent that did not get recorded (killed mid-run, or just after it ended)
            keys = ("capsbench.study", "capsbench.role", "capsbench.model", "capsbench.seed")
            earlier = tracking.find_runs({k: tags[k] for k in keys}, experiment=cfg.experiment)
            earlier = [r for r in earlier if r.parent_id == parent.run_id]
            resume = earlier[0].run_id if earlier else None
            base = bar.done  # epochs of the runs before this one
            if resume:
                try:
                    bar.skip(int(tracking.load_resume_state(resume).get("epoch", 0)))
                except tracking.CheckpointFileError as e:
                    study.log(f"train: not resuming run {resume}: {e}")
                    resume = None
                except tracking.TrackingError:
                    resume = None  # died before its first epoch: start over
            which = run_label(model, seed, len(seeds) > 1)
            study.log(f"train: {which}" + (f" (resuming run {resume})" if resume else ""))

            def on_epoch(epoch: int, metrics: dict, base=base, which=which, model=model) -> bool:
                bar.set(base + epoch, f"{which} epoch {epoch}/{epochs[model]}")
                return False  # progress only: a final training is never stopped early

            result = fit_fn(
                run_cfg,
                parent_run_id=parent.run_id,
                tags=tags,
                resume_run_id=resume,
                epoch_callback=on_epoch,
            )
            seed_runs, seed_history = state["seed_runs"], state["seed_history"]
            changes = {
                "seed_runs": {**seed_runs, model: {**seed_runs.get(model, {}), str(seed): result.run_id}},
                "seed_history": {
                    **seed_history,
                    model: {**seed_history.get(model, {}), str(seed): result.history},
                },
            }
            if seed == seeds[0]:  # the first seed's run is the model's final run (one run per model)
                parent.set_tags({f"capsbench.final.{model}": result.run_id})
                changes["final_runs"] = {**state["final_runs"], model: result.run_id}
                changes["final_history"] = {**state["final_history"], model: result.history}
            study.update_state(**changes)
    finally:
        bar.close()


def stage_viewpoint(study: Study, parent) -> None:
    from harness import data
    from harness import viewpoint as vp
    from harness.evaluate import plot_viewpoint_heatmap

    cfg = study.cfg
    if cfg.run.data.view == "none" or len(cfg.models) < 2:
        study.log("viewpoint: no view split (run.data.view = none) or a single model; nothing to match")
        return
    state = study.state()
    families = {m: model_family(m) for m in cfg.models}
    result = match_runs(
        study, {m: state["final_history"][m] for m in cfg.models}, state["final_runs"], families
    )
    table = vp.format_matched(result)
    study.log("viewpoint:\n" + table)
    test = data.get_dataset(
        cfg.run.data.name,
        "test",
        view=cfg.run.data.view,
        subset="all",
        channels=cfg.run.data.channels,
        root=study_data_folder(cfg),
    )
    index = vp.sample_indices(len(test), cfg.viewpoint.limit_test, cfg.viewpoint.seed)
    if len(index) < len(test):
        import torch

        test = test.select(torch.as_tensor(index))
    frames = []
    out = study.folder / "viewpoint"
    out.mkdir(exist_ok=True)
    bar = Progress(len(result.models), "viewpoint cells", "model", log=study.log)
    for m in result.models.values():
        cells = vp.checkpoint_cells(m.run_id, m.matched_epoch, test, batch_size=cfg.run.data.eval_batch_size)
        bar.update(1, m.model)
        cells.insert(0, "family", m.family)
        cells.insert(0, "model", m.model)
        frames.append(cells)
        grid = cells.pivot(index="elevation", columns="azimuth", values="error")
        png = plot_viewpoint_heatmap(
            grid, out / f"heatmap_{m.model}.png", f"{m.model}, matched epoch {m.matched_epoch}"
        )
        parent.log_file(png, "viewpoint")
    bar.close()
    import pandas as pd

    cells = pd.concat(frames, ignore_index=True)
    (out / "cells.csv").write_text(cells.to_csv(index=False))
    (out / "matched.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "matched.md").write_text(table + "\n")
    parent.log_metrics(vp.parent_metrics(result))
    parent.log_text(cells.to_csv(index=False), "viewpoint/cells.csv")
    parent.log_json(result.to_dict(), "viewpoint/matched.json")
    if len(study_seeds(cfg)) > 1:
        compare_seed_runs(study, parent, families)


def match_runs(study: Study, histories: dict, run_ids: dict[str, str], families: dict[str, str]):
    """The matched protocol (harness.viewpoint.match_checkpoints) on one set of runs, one per model."""
    from harness import viewpoint as vp

    cfg = study.cfg
    return vp.match_checkpoints(
        histories,
        families=families,
        view=cfg.run.data.view,
        reference=cfg.viewpoint.reference,
        run_ids=run_ids,
    )


def compare_seed_runs(study: Study, parent, families: dict[str, str]) -> None:
    """The matched protocol once per seed (models paired by seed) and the comparison over seeds."""
    from harness import viewpoint as vp

    cfg, state = study.cfg, study.state()
    results = {}
    for seed in study_seeds(cfg):
        histories = {m: state["seed_history"].get(m, {}).get(str(seed)) for m in cfg.models}
        if any(h is None for h in histories.values()):
            continue  # a seed without every model's final run cannot be paired
        run_ids = {m: state["seed_runs"][m][str(seed)] for m in cfg.models}
        results[seed] = match_runs(study, histories, run_ids, families)
    comparison = vp.compare_seeds(results)
    record = {**comparison.to_dict(), "matches": {str(s): r.to_dict() for s, r in results.items()}}
    out = study.folder / "viewpoint"
    out.mkdir(exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(record, indent=2))
    parent.log_json(record, "viewpoint/seeds.json")
    parent.log_metrics(vp.seed_parent_metrics(comparison))
    novel = ", ".join(f"{m} {e:pct}" for m, e in comparison.novel.items())
    study.log(f"viewpoint over seeds {comparison.seeds}: matched novel error {novel}; {comparison.verdict()}")


def stage_attack(study: Study, parent) -> None:
    """The attack suite on every final run (every seed), resumable per run."""
    from harness.attack import attack_run

    a = study.cfg.attack
    runs = final_runs(study)
    many = len(study_seeds(study.cfg)) > 1
    todo = [r for r in runs if r[2] not in study.state()["attacked_runs"]]
    bar = Progress(len(runs), "attack", "run", done=len(runs) - len(todo), log=study.log)
    try:
        for model, seed, run_id in todo:
            which = run_label(model, seed, many)
            study.log(f"attack: {which} ({', '.join(a.attacks)} at eps {a.eps}, {a.n_examples} images)")
            report = attack_run(run_id, a, progress=bar.tty)
            if getattr(report, "flags", None):
                study.log(f"attack: {which} gradient-masking flags: {report.flags}")
            state = study.state()
            attacked_runs = [*state["attacked_runs"], run_id]
            done_models = [
                m for m in study.cfg.models if all(r in attacked_runs for mm, _, r in runs if mm == m)
            ]
            study.update_state(attacked_runs=attacked_runs, attacked=done_models)
            bar.update(1, which)
    finally:
        bar.close()


def stage_report(study: Study, parent) -> None:
    from harness.report import write_report

    path = write_report(study.cfg.name)
    study.log(f"report: {path}")


STAGE_FUNCS = {
    "data": stage_data,
    "tune": stage_tune,
    "train": stage_train,
    "viewpoint": stage_viewpoint,
    "attack": stage_attack,
    "report": stage_report,
}
