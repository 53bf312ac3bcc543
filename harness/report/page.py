"""The report's page as a list of blocks (see harness/report/render.py): the answer in one sentence, the
error table, the accuracy-under-attack table, what is missing, notes, figures and provenance.
"""

from __future__ import annotations

import pandas as pd

from harness.report.notes import headline, provenance, study_notes
from harness.report.records import StudyRecords
from harness.report.tables import split_comparison

TABLE_NOTE = (
    "Errors in %, one row per final model. Test error: the final epoch, on every test image (familiar and "
    "novel views together when the study has a view split); familiar and novel errors: at the matched "
    "epochs; train samples/s: the median over epochs."
)
SEEDS_NOTE = (
    "Each cell is the mean ± the half-width of the 95% Student-t interval over the `seeds` training seeds "
    "(one final run per model and seed; the matched protocol pairs the models trained with the same seed)."
)
PAPER_NOTE = (
    "Rows starting `paper:` are the paper's numbers (its Table 1, §5.1 and, for FGSM, read off its Fig. 3), "
    "for reference: the paper trained on all of smallNORB's training images with its own budget."
)
ATTACK_NOTE = (
    "Accuracy in % (higher is better; the table above shows errors). `clean`: no perturbation, on the "
    "attacked images. Attack cells: untargeted accuracy under attack, worst case over the attack losses"
)


def build_blocks(
    records: StudyRecords, table: pd.DataFrame, figures: list[tuple[str, str]], skipped: list[str]
) -> list[tuple]:
    """The page: the answer in one sentence, the tables (``table`` = ``comparison_table(records)``), what is
    missing, notes, figures, provenance."""
    blocks: list[tuple] = [("h1", f"capsbench report: {records.name}"), ("p", f"**{headline(records)}**")]
    blocks.append(("h2", "Summary: errors"))
    if table.empty:
        blocks.append(("p", "No final runs yet, so no summary rows."))
    else:
        clean, attacked = split_comparison(table)
        blocks.append(("table", clean))
        has_paper = table["model"].str.startswith("paper:").any()
        several = "seeds" in table.columns
        blocks.append(
            (
                "p",
                " ".join(
                    [TABLE_NOTE, *([SEEDS_NOTE] if several else []), *([PAPER_NOTE] if has_paper else [])]
                ),
            )
        )
        if attacked is not None:
            blocks += [("h2", "Under attack: accuracy"), ("table", attacked)]
            targeted = any(" targeted success " in c for c in table.columns)
            what = (
                ", then / the targeted success rate (lower is better)"
                if targeted
                else " (no targeted attacks recorded)"
            )
            blocks.append(("p", f"{ATTACK_NOTE}{what}."))
    if records.missing:
        blocks += [("h2", "Missing"), ("ul", records.missing)]
    blocks += [("h2", "Notes"), ("ul", study_notes(records))]
    blocks.append(("h2", "Figures"))
    for filename, caption in figures:
        blocks.append(("figure", filename, caption))
    if skipped:
        blocks.append(("ul", [f"Not drawn: {s}" for s in skipped]))
    blocks += [("h2", "Provenance"), ("ul", provenance(records))]
    if records.study_toml:
        blocks.append(("code", "toml", "The resolved study file (study.toml)", records.study_toml))
    return blocks
