"""`station loso`: leave one renderer style out, train on the others, judge on the one left out.

A figure on images from the renderer a model trained on proves fit, not generality: a line's camera,
lamp and glass are never the renderer's. So for each style the models train on the other styles'
images and are judged on an independent set (another seed) of the style they never saw, through the
serving pipeline at the bundle's own calibrated threshold. ``OUT/loso.md`` is the table,
``OUT/loso.json`` every figure, of every fold written to ``OUT`` (folds run in parallel with ``--left-out``
share one table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from station.core.atomic import write_text_atomic
from station.core.report_format import num, pct
from station.errors import ConfigError

LOSO_FILE = "loso.md"


@dataclass(frozen=True)
class LosoPlan:
    out: Path
    styles: tuple[str, ...]
    train_seed: int = 1
    judge_seed: int = 2
    train_good: int = 60
    train_per_class: int = 20
    judge_per_class: int = 30
    novel: int = 30
    epochs: int = 60
    ae_steps: int = 1000
    threads: int = 0
    #: the styles to leave out in turn (default: every one); each is still trained without
    left_out: tuple[str, ...] = ()
    input_view: str = "residual"
    #: good bottles of the left-out style (another seed) the bundle is then recalibrated on, as a line
    #: installing a bundle runs `station calibrate` on its own good bottles; 0: not done
    calibrate_good: int = 30
    #: good bottles of the left-out style (the same seed) the bundle is then adapted to, as a line installing it
    #: runs `station adapt` (its autoencoder retrained on them, its map classifier kept); 0: not done
    adapt_good: int = 60
    lighting: Literal["front", "back", "auto", "per-frame"] = "per-frame"
    classes_from: str = "map"


def _row(style: str, trained_on: tuple[str, ...], f: dict[str, Any]) -> str:
    row = _cells(style, trained_on, f)
    for key, what in (("calibrated_on_line", "calibrated"), ("adapted_on_line", "adapted")):
        if f.get(key):
            row += _cells("", (f"↳ {what} on {f[key]['good']} of its good",), f[key]["figures"])
    return row


def _cells(style: str, trained_on: tuple[str, ...], f: dict[str, Any]) -> str:
    recall = f.get("per_class", {})
    defects = [c for c in recall if c != "good"]
    worst = min(defects, key=lambda c: recall[c]["recall"] or 0.0) if defects else None
    novel = f.get("novel") or {}
    auroc = f.get("image_auroc")
    return (f"| {style} | {', '.join(trained_on)} | {pct(f.get('accuracy'))} | "
            + (f"{worst} {pct(recall[worst]['recall'])}" if worst else "n/a")
            + f" | {pct(f.get('good_passed'))} | {pct(f.get('defects_rejected'))} | "
            f"{pct(novel.get('anomaly'))} / {pct(novel.get('combined'))} | "
            + num(auroc) + f" | {num(f.get('threshold'))} |\n")


def table(rows: list[tuple[str, tuple[str, ...], dict[str, Any]]]) -> str:
    head = ("| left out (judged) | trained on | 4-class accuracy | lowest defect recall | good passed | "
            "defects rejected | novel rejected (anomaly alone / combined) | image AUROC | threshold |\n"
            + "| --- " * 9 + "|")
    return head + "\n" + "".join(_row(s, t, f) for s, t, f in rows)


def run_loso(plan: LosoPlan) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    from station.core.bundle import load_bundle
    from station.tools.evaluate import folder_items
    from station.tools.synth import write_dataset
    from station.training.options import TrainOptions
    from station.training.train import train_bundle

    if len(plan.styles) < 2:
        raise ConfigError("--styles: leaving one out needs at least 2 styles")
    rows: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []
    for style in plan.left_out or plan.styles:
        others = tuple(s for s in plan.styles if s != style)
        tag = f"without-{style}"
        train_root = plan.out / "data" / tag
        judge_root = plan.out / "data" / f"judge-{style}"
        write_dataset(train_root, seed=plan.train_seed, train_good=plan.train_good,
                      test_per_class=plan.train_per_class, styles=others)
        write_dataset(judge_root, seed=plan.judge_seed, train_good=0, test_per_class=plan.judge_per_class,
                      novel=plan.novel, styles=(style,))
        model = plan.out / "models" / tag
        train_bundle(TrainOptions(data=train_root / "bottle", out=model, epochs=plan.epochs, ae_steps=plan.ae_steps,
                                  seed=plan.train_seed, threads=plan.threads, name=tag,
                                  input_view=plan.input_view, lighting=plan.lighting,
                                  classes_from=plan.classes_from))
        items = folder_items(judge_root / "bottle" / "test", load_bundle(model).manifest.classes)
        figures = _judge(model, items)
        if plan.calibrate_good:
            figures["calibrated_on_line"] = _judge_calibrated(plan, style, model, items)
        if plan.adapt_good:
            figures["adapted_on_line"] = _judge_adapted(plan, style, model, items)
        rows.append((style, others, figures))
        _write(plan, rows)
    return rows


def _judge(model: Path, items: list[Any]) -> dict[str, Any]:
    """``station evaluate``'s figures for the bundle at ``model`` on ``items``, through the serving pipeline."""
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.evaluate import metrics, run_evaluation

    pipeline = Pipeline(load_bundle(model))
    return metrics(run_evaluation(pipeline, items, keep_overlays=False), pipeline)


def _judge_calibrated(plan: LosoPlan, style: str, model: Path, items: list[Any]) -> dict[str, Any]:
    """The bundle recalibrated on good bottles of the left-out style (no labels, no training), judged again."""
    import shutil

    from station.core.bundle import load_bundle
    from station.tools.calibrate import good_frames, recalibrate
    from station.tools.synth import write_dataset

    line_root = plan.out / "data" / f"line-good-{style}"
    write_dataset(line_root, seed=plan.judge_seed + 1000, train_good=plan.calibrate_good, test_per_class=0,
                  styles=(style,))
    frames = good_frames(line_root / "bottle" / "train" / "good", "line good bottles")
    calibrated = model.with_name(model.name + "-calibrated")
    shutil.rmtree(calibrated, ignore_errors=True)
    shutil.copytree(model, calibrated)
    recalibrate(load_bundle(calibrated), frames, 0.01)
    return {"good": len(frames), "figures": _judge(calibrated, items)}


def _judge_adapted(plan: LosoPlan, style: str, model: Path, items: list[Any]) -> dict[str, Any]:
    """The bundle adapted to good bottles of the left-out style (no labels), judged again."""
    from station.tools.synth import write_dataset
    from station.training.adapt import AdaptOptions, adapt_bundle

    line_root = plan.out / "data" / f"adapt-good-{style}"
    write_dataset(line_root, seed=plan.judge_seed + 1000, train_good=plan.adapt_good, test_per_class=0,
                  styles=(style,))
    adapted = model.with_name(model.name + "-adapted")
    adapt_bundle(AdaptOptions(model=model, good=line_root / "bottle" / "train" / "good", out=adapted,
                              ae_steps=plan.ae_steps, seed=plan.train_seed, threads=plan.threads))
    return {"good": plan.adapt_good, "figures": _judge(adapted, items)}


def _write(plan: LosoPlan, rows: list[tuple[str, tuple[str, ...], dict[str, Any]]]) -> None:
    """Each fold's figures in ``OUT/folds/<style>.json``; ``loso.json`` and ``loso.md`` from every fold there.

    Folds run in parallel (``--left-out``, one process each) into one ``--out``: each writes its own fold's
    file, then the table of all the folds written so far, so the last to finish leaves the whole table.
    """
    folds = plan.out / "folds"
    folds.mkdir(parents=True, exist_ok=True)
    plan_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(plan).items()}
    for style, trained_on, figures in rows:
        # Each fold keeps the plan it ran under: a fold of an earlier run in the same folder says how it was made.
        record = {"left_out": style, "trained_on": list(trained_on), "plan": plan_record, "figures": figures}
        write_text_atomic(folds / f"{style}.json", json.dumps(record, indent=2, default=str))
    done = {}
    for path in folds.glob("*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        done[record["left_out"]] = record
    order = [s for s in plan.styles if s in done] + sorted(s for s in done if s not in plan.styles)
    results = [done[s] for s in order]
    write_text_atomic(plan.out / "loso.json", json.dumps({"plan": plan_record, "results": results}, indent=2,
                                                         default=str))
    write_text_atomic(plan.out / LOSO_FILE, table([(r["left_out"], tuple(r["trained_on"]), r["figures"])
                                                   for r in results]))
