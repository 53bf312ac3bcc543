"""The adversarial suite: attacks against float64 hand computations, the ε sweep's definitions, the
gradient-masking checks (on healthy and on deliberately masked models), the outputs, and the CLI end to end.

The models are ``cnn_small`` at 16×16 trained for a second on a learnable toy task (five classes, each a
bright bar at its own row over noise), so the tests need no dataset files.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks

from harness import attack as attack_cli
from harness.attack import (
    EPS_UNITS,
    AttackError,
    AttackName,
    AttackSettings,
    LinfSignAttack,
    curves,
    eps_sweep,
    evaluate_attacks,
    make_attack,
    margin_loss,
    parse_eps,
    parse_names,
)
from harness.attack.attacks import predicted_classes, set_target_offset
from harness.attack.checks import gradient_flags, input_gradient_stats, iterative_flags, monotone_flags
from harness.attack.outputs import write_outputs
from harness.attack.tracked import report_metrics
from models import create_model, list_models

CLASSES = 5


def bars(n: int, seed: int, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a bright horizontal bar at row 2 + 3k over uniform noise; pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.rand(n, 1, side, side, generator=g) * 0.3 + 0.2
    for k in range(CLASSES):
        x[y == k, :, 2 + 3 * k : 4 + 3 * k, 2 : side - 2] += 0.45
    return x.clamp(0, 1), y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small models run fastest on one thread, and the CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    torch.manual_seed(0)
    model = create_model("cnn_small", input_size=16, num_classes=CLASSES, dropout=0.0)
    x, y = bars(600, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        i = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = bars(60, seed=1)
    return model, xt, yt


@pytest.fixture(scope="module")
def report(trained):
    model, x, y = trained
    settings = AttackSettings(
        attacks=["fgsm", "bim", "pgd"],
        eps=[0, 0.05, 0.1, 0.2, 0.3],
        targeted=True,
        steps=10,
        check_examples=40,
        check_steps=30,
    )
    return evaluate_attacks(model, x, y, settings, progress=False)


class Saturate(nn.Module):
    """Logits scaled by 1e4: softmax saturates, so cross-entropy's input gradient is exactly zero."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1e4 * self.inner(x)


class Quantize(nn.Module):
    """Rounds its input to 1/8 steps before the network: zero input gradient everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 8) / 8)


def grad64(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Input gradient of the summed loss in float64 (the reference)."""
    m64 = copy.deepcopy(model).double().eval()
    x64 = x.double().requires_grad_(True)
    logits = m64(x64)
    if loss == "ce":
        cost = F.cross_entropy(logits, y, reduction="sum")
    else:  # max_{j≠y} z_j − z_y, by explicit loops
        cost = sum(
            max(logits[i, j] for j in range(CLASSES) if j != y[i]) - logits[i, y[i]] for i in range(len(y))
        )
    return torch.autograd.grad(cost, x64)[0]


# ---------------------------------------------------------------------------------------------
# attacks against hand computations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_fgsm_is_x_plus_eps_sign_grad_clipped(trained, loss):
    model, x, y = trained
    # start near the decision boundary: where softmax saturates in float32 (p_y rounds to 1) cross-entropy's
    # float32 gradient loses the true class's term and no longer matches float64, whatever the attack code
    x = make_attack(model, "bim", "margin", 0.08, steps=10)(x, y)
    with torch.no_grad():
        p64 = copy.deepcopy(model).double()(x.double()).softmax(1).amax(1)
    keep = p64 < 0.999 if loss == "ce" else torch.ones(len(x), dtype=torch.bool)
    assert keep.sum() >= 10
    x, y = x[keep], y[keep]
    eps = 0.1
    adv = make_attack(model, "fgsm", loss, eps)(x, y)
    g = grad64(model, x, y, loss)
    ref = (x.double() + eps * g.sign()).clamp(0, 1)
    scale = g.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
    clear = g.abs() > 1e-4 * scale  # pixels whose gradient sign float32 surely gets right
    assert clear.float().mean() > 0.9
    assert torch.allclose(adv.double()[clear], ref[clear], atol=1e-6)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_margin_loss_matches_loops():
    logits = torch.randn(7, CLASSES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (7,))
    t = (y + 2) % CLASSES
    best_other = lambda i, c: max(logits[i, j] for j in range(CLASSES) if j != c)  # noqa: E731
    untargeted = sum(best_other(i, y[i]) - logits[i, y[i]] for i in range(7))
    targeted = sum(logits[i, t[i]] - best_other(i, t[i]) for i in range(7))
    assert torch.isclose(margin_loss(logits, y), untargeted)
    assert torch.isclose(margin_loss(logits, y, t), targeted)


@pytest.mark.parametrize("kind", ["fgsm", "bim", "pgd"])
def test_linf_sign_attack_follows_torchattacks_rules(trained, kind):
    """With cross-entropy, the margin attack's class reproduces torchattacks' FGSM / BIM / PGD exactly."""
    model, x, y = trained
    eps, steps = 0.08, 4
    theirs = {
        "fgsm": torchattacks.FGSM(model, eps=eps),
        "bim": torchattacks.BIM(model, eps=eps, alpha=2.5 * eps / steps, steps=steps),
        "pgd": torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True),
    }[kind]
    ours = LinfSignAttack(model, kind, eps=eps, steps=steps, loss="ce")
    torch.manual_seed(3)
    a = theirs(x, y)
    torch.manual_seed(3)
    b = ours(x, y)
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the sweep's definitions
# ---------------------------------------------------------------------------------------------


def test_eps0_equals_clean_accuracy(trained, report):
    model, x, y = trained
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    assert report.clean_accuracy == clean
    at0 = report.table[(report.table.eps == 0) & (report.table["mode"] == "untargeted")]
    assert len(at0) == 9 and (at0.accuracy == clean).all()  # 3 attacks × (ce, margin, worst)


def test_curves_are_monotone_and_worst_is_worst(report):
    acc = curves(report.table, "untargeted")
    slack = 1 / report.n_examples + 1e-9
    assert (acc.diff(axis=1).iloc[:, 1:] <= slack).all().all(), acc
    for attack in ("fgsm", "bim", "pgd"):
        worst = acc.loc[(attack, "worst")]
        assert (worst <= acc.loc[(attack, "ce")] + 1e-9).all() and (
            worst <= acc.loc[(attack, "margin")] + 1e-9
        ).all()
    assert acc.loc[("bim", "worst"), 0.3] < 0.2 < report.clean_accuracy  # the attacks do bite
    assert report.flags == [], report.flags  # a healthy model raises no masking flag
    assert report.checks["unbounded_accuracy"] <= 0.05


def test_targeted_mode_moves_predictions_toward_the_target(trained, report):
    success = curves(report.table, "targeted")
    assert (success[0.0] < 0.05).all() and (success[0.3] > 0.5).all()
    model, x, y = trained
    atk = make_attack(model, "bim", "margin", 0.1, steps=5)
    set_target_offset(atk, 2, CLASSES)
    target = (y + 2) % CLASSES
    adv = atk(x, y)
    with torch.no_grad():
        gap = lambda z: z.gather(1, target[:, None]).squeeze(1) - z.max(1).values  # noqa: E731
        before, after = gap(model(x)), gap(model(adv))
    assert (after > before).float().mean() > 0.95  # the target's logit climbs toward the top


def test_untargeted_counts_only_clean_correct_examples():
    """An example the model gets wrong stays wrong, whatever the attack does to it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0], [0.6, 0.4, 0, 0]]).view(3, 1, 2, 2)
    y = torch.tensor([0, 1, 1])  # the third is misclassified
    settings = AttackSettings(attacks=["fgsm"], eps=[0, 0.05, 0.5], losses=["margin"], targeted=True)
    table = eps_sweep(model, x, y, settings, progress=False)
    acc = curves(table).loc[("fgsm", "margin")]
    assert acc[0.0] == pytest.approx(2 / 3) and acc[0.05] == pytest.approx(2 / 3) and acc[0.5] == 0
    hit = curves(table, "targeted").loc[("fgsm", "margin")]
    assert hit[0.0] == pytest.approx(1 / 3) and hit[0.5] == 1  # two classes: the one target is the other


# ---------------------------------------------------------------------------------------------
# gradient-masking checks
# ---------------------------------------------------------------------------------------------


def test_masking_check_fires_on_saturated_outputs(trained):
    model, x, y = trained
    settings = AttackSettings(
        attacks=["fgsm"], eps=[0, 0.1, 0.3], steps=3, check_examples=30, check_steps=20, targeted=False
    )
    r = evaluate_attacks(Saturate(model), x, y, settings, progress=False)
    assert any(f.startswith("zero-gradient: ce") for f in r.flags), r.flags
    acc = curves(r.table)
    assert acc.loc[("fgsm", "ce"), 0.3] == r.clean_accuracy  # cross-entropy sees nothing ...
    assert acc.loc[("fgsm", "worst"), 0.3] < 0.5 * r.clean_accuracy  # ... the margin loss still bites


def test_masking_check_fires_on_zero_gradients(trained):
    model, x, y = trained
    settings = AttackSettings(
        attacks=["fgsm", "bim"], eps=[0, 0.1], steps=3, check_examples=30, check_steps=10, targeted=False
    )
    r = evaluate_attacks(Quantize(model), x, y, settings, progress=False)
    kinds = {f.split(":")[0] for f in r.flags}
    assert {"zero-gradient", "unbounded-attack"} <= kinds, r.flags
    assert r.checks["unbounded_accuracy"] > 0.9


def test_nonfinite_gradients_are_flagged(trained):
    model, x, y = trained

    class NanGrad(nn.Module):  # same outputs, but d sqrt(u)/du at u = 0 is inf, and 0 * inf = NaN
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x) + 0 * torch.sqrt(x - x.detach()).sum()

    stats = input_gradient_stats(NanGrad(), x[:8], y[:8], AttackSettings(losses=["ce", "margin"]))
    assert stats["margin"] == {"zero_fraction": 0.0, "nonfinite_fraction": 1.0}
    flags = gradient_flags(stats, max_zero_fraction=0.05)
    assert [f.split(":")[0] for f in flags] == ["nonfinite-gradient", "nonfinite-gradient"]
    stats = input_gradient_stats(model, x[:8], y[:8], AttackSettings(losses=["ce"]))
    assert gradient_flags(stats, 0.05) == []


def test_monotone_and_iterative_checks_on_tables():
    cols = ["attack", "loss", "mode", "eps", "accuracy", "targeted_success"]
    rows = [
        ("fgsm", "ce", "untargeted", 0.0, 0.9, None), ("fgsm", "ce", "untargeted", 0.1, 0.4, None),
        ("fgsm", "ce", "untargeted", 0.2, 0.6, None),  # FGSM rises: a note while BIM keeps falling
        ("bim", "ce", "untargeted", 0.0, 0.9, None), ("bim", "ce", "untargeted", 0.1, 0.5, None),  # weaker
        ("bim", "ce", "untargeted", 0.2, 0.1, None),
        ("fgsm", "ce", "targeted", 0.1, None, 0.5), ("fgsm", "ce", "targeted", 0.2, None, 0.3),  # FGSM alone
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=cols)
    flags, notes = monotone_flags(table, tol=0.05)
    assert flags == [
        "non-monotone: fgsm targeted targeted_success falls with eps "
        "(ce 0.500 at eps 0.1 -> 0.300 at eps 0.2) "
        "(single-step overshoot or gradient masking: add bim/pgd to tell)"
    ]
    assert len(notes) == 1 and notes[0].startswith(
        "non-monotone: fgsm untargeted accuracy rises with eps (ce 0.400"
    )
    weak = iterative_flags(table, tol=0.05)
    assert len(weak) == 1
    assert weak[0].startswith("weak-iterative: bim/ce accuracy 0.500 > fgsm 0.400 at eps 0.1")
    assert monotone_flags(table, tol=0.25) == ([], []) and iterative_flags(table, tol=0.2) == []

    curve = [(0, 0.9), (0.1, 0.2), (0.2, 0.5)]
    rising_bim = pd.DataFrame(
        [("bim", loss, "untargeted", e, a, None) for loss in ("ce", "worst") for e, a in curve],
        columns=cols,
    )  # fmt: skip
    flags, notes = monotone_flags(rising_bim, tol=0.05)
    assert notes == [] and len(flags) == 2
    assert flags[0].startswith(
        "non-monotone: bim untargeted accuracy rises with eps (ce 0.200 at eps 0.1 -> 0.500"
    )
    assert "; worst 0.200" in flags[0] and "best attack per eps rises" in flags[1]


# ---------------------------------------------------------------------------------------------
# arguments and outputs
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_fail_with_the_fix(trained):
    model, x, y = trained
    with pytest.raises(AttackError, match="outside \\[0, 1\\]: eps is in \\[0,1\\] pixel units"):
        parse_eps("0,1.5")
    with pytest.raises(AttackError, match="unknown attack 'cw': use one of 'fgsm', 'bim', 'pgd'"):
        parse_names("fgsm,cw", AttackName, "attack")
    with pytest.raises(AttackError, match="not \\[0,1\\]: pass the dataset's preprocessed pixels"):
        eps_sweep(model, (x - 0.5) / 0.2, y, progress=False)
    with pytest.raises(AttackError, match="labels must lie in 0..4"):
        eps_sweep(model, x, y + 5, progress=False)
    assert parse_eps("0.1, 0 ,0.1") == [0.0, 0.1]


def test_settings_are_checked_in_one_place():
    s = AttackSettings(
        attacks="PGD, fgsm,pgd", eps="0.2,0,0.2", losses=["margin"], checkpoint="3"
    ).validated()
    assert (s.attacks, s.eps, s.losses, s.checkpoint) == (["pgd", "fgsm"], [0.0, 0.2], ["margin"], 3)
    assert s.validated() == s and AttackSettings().validated() == AttackSettings()  # defaults are canonical
    with pytest.raises(AttackError, match="check_steps must be at least 1, got 0"):
        AttackSettings(check_steps=0).validated()
    with pytest.raises(AttackError, match="unknown loss 'hinge': use one of 'ce', 'margin'"):
        AttackSettings(losses=["hinge"]).validated()
    light = "import sys; import harness.attack.settings; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", light], check=True)  # the report and study config read it


def test_outputs_say_the_units_and_show_the_flags(trained, report, tmp_path):
    flagged = copy.copy(report)
    flagged.flags = ["zero-gradient: ce loss input gradient is exactly zero for 100.0% of examples"]
    paths = write_outputs(flagged, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["eps_units"] == EPS_UNITS and data["flags"] == flagged.flags
    assert len(data["table"]) == len(report.table) and data["clean_accuracy"] == report.clean_accuracy
    csv = pd.read_csv(paths["csv"])
    assert (csv.eps_units == EPS_UNITS).all() and csv.masking_flags.str.startswith("zero-gradient").all()
    assert paths["png"].stat().st_size > 10_000
    text = attack_cli.format_report(flagged)
    assert "[0,1] pixel units of the model input" in text and "GRADIENT-MASKING FLAGS (1)" in text
    assert "eps=0.3" in text and "targeted success" in text
    assert "no flags" in attack_cli.format_report(report)
    metrics = report_metrics(report)
    assert metrics["attack/bim/worst/acc_eps_0.3"] == curves(report.table).loc[("bim", "worst"), 0.3]
    assert "attack/pgd/margin/targeted_success_eps_0.05" in metrics and "attack/fgsm/ce/acc_eps_0" in metrics


SLOW_MODELS = {"em_capsnet"}  # ~10 s per forward-backward batch on a busy 2-core CPU


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_MODELS else []) for n in list_models()]
)
def test_every_registered_model_can_be_attacked(name):
    """One code path for every family: logits in, finite gradients, adversarial examples inside the ball."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=CLASSES, input_size=32).eval()
    x, y = torch.rand(3, 1, 32, 32), torch.arange(3)
    adv = make_attack(model, "bim", "margin", 0.1, steps=1)(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    settings = AttackSettings(attacks=["fgsm"], eps=[0, 0.1], targeted=False, check_examples=3, check_steps=1)
    r = evaluate_attacks(model, x, y, settings, progress=False)
    assert r.checks["input_gradients"]["margin"]["nonfinite_fraction"] == 0
    assert len(r.table) == 6 and r.table.accuracy.between(0, 1).all()


def test_predicted_classes_match_the_model(trained):
    model, x, y = trained
    pred, classes = predicted_classes(model, x, batch_size=7)
    assert classes == CLASSES and torch.equal(pred, model(x).argmax(1))


def test_cli_help_names_the_units(capsys):
    with pytest.raises(SystemExit):
        attack_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "[0,1] pixel units" in out and "--study" in out and "--targeted" in out


# ---------------------------------------------------------------------------------------------
# end to end: a run trained by the common runner, in a temporary MLflow store
# ---------------------------------------------------------------------------------------------

STUDY = "attack_e2e"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, one_thread):
    """A cnn_small run on a tiny synthnorb (one elevation, one lighting), tagged as a study's final model."""
    from harness import train
    from harness.config import RunConfig, apply_overrides
    from harness.data import synthnorb

    root = tmp_path_factory.mktemp("synthnorb")
    synthnorb.synthesize(root, image_size=48, lightings=1, elevations=1, progress=False)
    store = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        cfg = apply_overrides(RunConfig(), [
            "experiment=attack", "model.name=cnn_small", "data.name=synthnorb", f"data.root={root}",
            "train.epochs=3", "train.system_metrics=false", "data.batch_size=32",
        ])  # fmt: skip
        result = train.fit(cfg, tags={"capsbench.study": STUDY, "capsbench.role": "final"})
        yield result.run_id


def test_cli_end_to_end_logs_into_the_run(tracked_run, capsys):
    from harness import tracking

    args = f"--fgsm --bim --targeted --run-id {tracked_run} --eps 0,0.05,0.1 --n-examples 40 --steps 3"
    args = [*args.split(), "--check-examples", "20", "--check-steps", "10", "--quiet"]
    assert attack_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "cnn_small" in out and "[0,1] pixel units of the model input" in out and "eps=0.1" in out
    assert "targeted success" in out and ("no flags" in out or "GRADIENT-MASKING FLAGS" in out)

    run = tracking.get_run(tracked_run)
    m, tags = run.metrics, run.tags
    model, cfg = tracking.load_model(tracked_run)
    x, y, _ = attack_cli.load_examples(cfg, AttackSettings(n_examples=40, seed=0))
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    assert m["attack/clean_accuracy"] == pytest.approx(clean) and clean > 0.3  # chance is 0.2
    for attack in ("fgsm", "bim"):
        for loss in ("ce", "margin", "worst"):
            assert m[f"attack/{attack}/{loss}/acc_eps_0"] == pytest.approx(clean)
            assert m[f"attack/{attack}/{loss}/acc_eps_0.1"] <= m[f"attack/{attack}/{loss}/acc_eps_0"]
            assert f"attack/{attack}/{loss}/targeted_success_eps_0.05" in m
    assert "attack.masking_flags" in tags and "pixel units" in tags["attack.eps_units"]
    assert json.loads(tags["attack.settings"])["n_examples"] == 40
    files = set(tracking.list_artifacts(tracked_run, "attack"))
    assert files == {"attack/results.json", "attack/results.csv", "attack/accuracy_vs_eps.png"}
    saved = json.loads(tracking.read_artifact_text(tracked_run, "attack/results.json"))
    assert saved["run_id"] == tracked_run
    assert "; ".join(saved["flags"]) == tags["attack.masking_flags"]


def test_study_mode_and_bad_input(tracked_run, capsys):
    settings = AttackSettings(
        attacks=["fgsm"], eps=[0, 0.1], losses=["ce"], targeted=False, n_examples=20, checks=False
    )
    reports = attack_cli.attack_study(STUDY, settings, log=False, progress=False)
    assert [r.run_id for r in reports] == [tracked_run] and reports[0].flags == []
    assert "checks: NOT RUN" in attack_cli.format_report(reports[0])
    assert attack_cli.main(["--study", "no_such_study", "--no-log"]) == 2
    assert "study 'no_such_study' has no runs" in capsys.readouterr().err
    assert attack_cli.main(["--run-id", tracked_run, "--eps", "0,2", "--no-log"]) == 2
    assert "eps 2.0 is outside [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --run-id or --study is required
        attack_cli.main(["--fgsm"])
