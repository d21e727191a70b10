"""A segmentation head run (`train-seg`, evaluated by `eval-seg`) in the report: its scores per evaluation,
per-class IoU as bars grouped head / middle / tail, the confusion matrix and the training curves; and one
table comparing every head of the page (plain features against GATE-chosen ones, say).

Read from the run folder: ``config.json`` (the config, the classes with their groups, the identity of the stores it
trained on), ``metrics.json`` (validation), ``eval-*/metrics.json`` and ``eval-*/confusion.png`` (`eval-seg`),
``curves.png``; and where the run stands when it has not finished: ``status.json`` (why its last call stopped: a
diverged loss, non-finite features) or its latest checkpoint. The stores it trained on are checked against what it
recorded (`difffeat.store.identity`): still there, same features, same shards.
"""

from __future__ import annotations

import re
from pathlib import Path

from difffeat.report.kinds import SectionKind
from difffeat.report.page import (
    Section,
    esc,
    figure_png,
    img,
    img_file,
    note,
    pct,
    pyplot,
    read_json_or,
    table,
)

GROUP_COLOURS = {"head": "#4a78b5", "middle": "#e0a030", "tail": "#b03a2e", "other": "#8a8a8a"}
SCORES = (("miou", "mIoU"), ("miou_head", "head"), ("miou_middle", "middle"), ("miou_tail", "tail"),
          ("pixel_accuracy", "pixel acc."))


def is_seg_run(path: Path, saved: dict | None) -> bool:
    """A train-seg run: marked so, or (before the runs carried a kind) a config with classes and masks."""
    if saved and saved.get("kind"):
        return saved["kind"] in ("train-seg", "seg")
    config = (saved or {}).get("config") or {}
    return bool(saved) and "classes" in saved and "masks" in config


def head_option(config: dict, name: str):
    """A head option of a saved config: under ``head`` (the head's options, a nested dict), or at the top level
    where runs written before the nesting kept it."""
    head = config.get("head")
    return head.get(name) if isinstance(head, dict) else config.get(name)


def head_kind(config: dict) -> str:
    """The head's kind of a saved config: ``head.kind``, or the string older runs kept under ``head``."""
    head = config.get("head", "?")
    return head.get("kind", "?") if isinstance(head, dict) else head


def evaluations(path: Path, saved: dict) -> list[tuple[str, Path, dict]]:
    """(label, folder, scores) of every evaluation of the run: ``eval-*`` folders (test first), then the
    validation scores training wrote."""
    found = []
    for folder in sorted(path.glob("eval-*"), key=lambda p: (p.name != "eval-test", p.name)):
        scores = read_json_or(folder / "metrics.json")
        if isinstance(scores, dict) and "miou" in scores:
            found.append((f"{scores.get('split') or folder.name.removeprefix('eval-')} (eval-seg)", folder, scores))
    scores = read_json_or(path / "metrics.json")
    if isinstance(scores, dict) and "miou" in scores:
        split = ((saved.get("config") or {}).get("val_split")) or "validation"
        found.append((f"{split} (training)", path, scores))
    return found


def iou_bars(scores: dict, groups: dict[str, list[str]], title: str) -> bytes:
    """Per-class IoU as bars, classes grouped head | middle | tail (each in train-frequency order)."""
    plt = pyplot()
    per_class = scores.get("per_class_iou") or {}
    order = [(g, c) for g in ("head", "middle", "tail") for c in groups.get(g, []) if c in per_class]
    seen = {c for _, c in order}
    order += [("other", c) for c in per_class if c not in seen]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.42 * len(order) + 1.5), 3.3))
    for i, (group, name) in enumerate(order):
        value = per_class[name]
        if value is None:  # neither in the masks nor predicted: no IoU, say so instead of drawing 0
            ax.text(i, 1, "n/a", ha="center", va="bottom", fontsize=7, color="#888", rotation=90)
        else:
            ax.bar(i, 100 * value, color=GROUP_COLOURS[group])
            ax.text(i, 100 * value + 1, f"{100 * value:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(order)), [c for _, c in order], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 108)
    start = 0
    for group in ("head", "middle", "tail", "other"):
        count = sum(1 for g, _ in order if g == group)
        if count:
            mean = scores.get(f"miou_{group}")
            label = f"{group} {pct(mean)}" if group != "other" else group
            ax.axvspan(start - 0.5, start + count - 0.5, color=GROUP_COLOURS[group], alpha=0.07)
            ax.text(start + count / 2 - 0.5, 106, label, ha="center", va="top", fontsize=8, color=GROUP_COLOURS[group],
                    weight="bold")
            start += count
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def confusion_png(matrix: list[list[float]], names: list[str]) -> bytes:
    """The row-normalised confusion matrix, for an evaluation that saved the matrix but no picture."""
    import numpy as np

    plt = pyplot()
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.4 * k, 1.5 + 0.4 * k))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return figure_png(fig)


def describe_features(config: dict) -> str:
    """Which features a head was trained on: the stores and, when chosen, the layers (variant/layer)."""
    stores = [Path(str(s)).name for s in config.get("features") or []]
    layers = config.get("layers") or []
    text = ", ".join(stores) or "?"
    if layers:
        text += " → " + ", ".join(map(str, layers))
    variants = head_option(config, "variants")
    if len(config.get("features") or []) > 1 or variants not in (None, "concat"):
        text += f" ({variants or 'concat'})"
    return text


def render_seg(path: Path, saved: dict, anchor: str, shown_as: str) -> Section:
    """The section of one train-seg run folder."""
    config = saved.get("config") or {}
    classes = saved.get("classes") or {}
    groups = classes.get("groups") or {}
    evals = evaluations(path, saved)
    state = run_state(path, config)
    bank = " + memory bank" if config.get("memory_bank") else ""
    head = head_kind(config)
    parts = [f"<p class='sub'>features <code>{esc(describe_features(config))}</code> · head "
             f"<b>{esc(head)}</b> · loss <b>{esc(config.get('loss', '?'))}</b>{bank}"
             + f" · {esc(config.get('iterations', '?'))} iterations, batch {esc(config.get('batch_size', '?'))}, "
             f"lr {esc(config.get('lr', '?'))}, seed {esc(config.get('seed', '?'))} · trained on "
             f"<code>{esc(config.get('split') or 'all keys')}</code></p>"]
    if state is not None:
        parts.append(note(state[1], "warn"))
    stores = saved.get("stores") or []
    if evals:
        rows = [[esc(label), *[pct(s.get(k)) for k, _ in SCORES], esc(s.get("images", "")),
                 esc(eval_features(stores, s))] for label, _, s in evals]
        parts.append(table(["evaluation", *[f"{name} (%)" for _, name in SCORES], "images", "features"], rows))
        label, folder, scores = evals[0]
        parts.append("<div class='row'><div>")
        parts.append(img(iou_bars(scores, groups, f"per-class IoU, {label}"), "per-class IoU"))
        parts.append("</div><div>")
        if (folder / "confusion.png").is_file():
            parts.append(img_file(folder / "confusion.png", "confusion matrix", width=520))
        elif scores.get("confusion_matrix") and classes.get("names"):
            matrix = confusion_png(scores["confusion_matrix"], classes["names"])
            parts.append(img(matrix, "confusion matrix", width=520))
        parts.append("</div></div>")
    elif state is None:
        parts.append(note("No scores: the run finished without a validation split (train with --val-split, or score "
                          "it with eval-seg).", "warn"))
    if stores:
        parts.append("<h3>Feature stores</h3>" + table(["store", "at training", "now"], [
            [f"<code>{esc(r.get('path', '?'))}</code>", esc(_recorded(r)), esc(store_now(r))] for r in stores]))
    if (path / "curves.png").is_file():
        parts.append("<h3>Training</h3>" + img_file(path / "curves.png", "training curves"))
    main = evals[0][2] if evals else {}
    data = {"run": shown_as, "anchor": anchor, "features": describe_features(config), "loss": config.get("loss"),
            "head": head, "iterations": config.get("iterations"), "seed": config.get("seed"),
            "evaluation": evals[0][0] if evals else None, "scores": {k: main.get(k) for k, _ in SCORES}}
    overview = (f"{evals[0][0]}: mIoU {pct(main.get('miou'))} (head {pct(main.get('miou_head'))}, middle "
                f"{pct(main.get('miou_middle'))}, tail {pct(main.get('miou_tail'))})") if evals else \
        state[0] if state is not None else "no scores (no validation split; run eval-seg)"
    return Section("train-seg", f"Segmentation head · {shown_as}", anchor, "\n".join(parts), overview, data)


def run_state(path: Path, config: dict) -> tuple[str, str] | None:
    """(overview, note) saying where a run stands that has not finished cleanly: stopped by an error (its status
    file), or interrupted / stopped early (its latest checkpoint, or none); None for a finished run."""
    total = config.get("iterations", "?")
    resume = f"difffeat train-seg --config {path.as_posix()}/config.json --out {path.as_posix()} --resume"
    status = read_json_or(path / "status.json")
    latest = read_json_or(path / "checkpoints" / "latest.json")
    step = latest.get("step") if isinstance(latest, dict) else None
    if isinstance(status, dict) and status.get("state") == "stopped":
        where = f"latest checkpoint at iteration {step} of {total}" if step else "no checkpoint was written"
        return (f"stopped: {str(status.get('reason', '?'))[:80]}",
                f"Stopped before the end: {status.get('reason', '?')} ({where}). Fix the cause (a lower --lr, or "
                "the features), then train again (--overwrite, or another --out).")
    if (path / "model.safetensors").is_file():
        return None
    if step is None:
        return ("not started: no checkpoint yet", f"Unfinished: no checkpoint yet of {total} iterations (the run "
                f"stopped before its first checkpoint); continue it with `{resume}`.")
    name = str(latest.get("dir", ""))  # read from a file: only a checkpoint folder of this run
    loss = _last_loss(path / "checkpoints" / name / "state.json") if re.fullmatch(r"step-\d+", name) else None
    said = f"; last logged loss {loss:.4g}" if loss is not None else ""
    return (f"unfinished: iteration {step} of {total}", f"Unfinished: trained to iteration {step} of {total} (its "
            f"latest checkpoint{said}; interrupted, or stopped with --stop-after); continue it with `{resume}`.")


def _last_loss(state_file: Path) -> float | None:
    state = read_json_or(state_file)
    history = state.get("history") if isinstance(state, dict) else None
    losses = [h["loss"] for h in history or [] if isinstance(h, dict) and isinstance(h.get("loss"), (int, float))]
    return float(losses[-1]) if losses else None


def _recorded(record: dict) -> str:
    if "features_hash" not in record:
        return "not recorded (a run made before stores were pinned)"
    return f"{record.get('images', '?')} images, model {record.get('model', '?')}, t {record.get('timesteps', '?')}"


def store_now(record: dict) -> str:
    """The store a run recorded, as it is now: unchanged, changed (how), or gone."""
    from difffeat.errors import UserError
    from difffeat.store.identity import changed_since

    if "features_hash" not in record:
        return "not checked"
    path = next((p for p in (record.get("resolved"), record.get("path")) if p and Path(p).is_dir()), None)
    if path is None:
        return "missing: no store there any more"
    try:
        why = changed_since(record, path)
    except UserError as e:
        return f"unreadable: {e}"
    return f"changed since training: {why}" if why else "unchanged since training ✔"


def eval_features(stores: list[dict], scores: dict) -> str:
    """Whether an evaluation scored features extracted as the run's training stores were ("–": not recorded)."""
    from difffeat.spine.run import differing_fields

    given = scores.get("stores")
    if not isinstance(given, list) or not stores or any("features_hash" not in r for r in stores):
        return "–"
    for trained, scored in zip(stores, given):
        scored = scored if isinstance(scored, dict) else {}
        if scored.get("features_hash") != trained["features_hash"]:
            differ = differing_fields(trained.get("features") or {}, scored.get("features") or {})
            return f"other features ({', '.join(differ) or '?'})"
    return "as trained ✔"


def comparison(sections: list[Section]) -> str:
    """One table over every segmentation head of the page; the best mIoU per evaluation is highlighted."""
    rows, classes = [], []
    best = {}
    for s in sections:
        d = s.data
        key = d.get("evaluation")
        value = d["scores"].get("miou")
        if isinstance(value, (int, float)) and value > best.get(key, -1):
            best[key] = value
    for s in sections:
        d = s.data
        rows.append([f"<a href='#{esc(d['anchor'])}'>{esc(d['run'])}</a>", f"<code>{esc(d['features'])}</code>",
                     esc(d.get("loss")), esc(d.get("head")), esc(d.get("iterations")), esc(d.get("evaluation") or "–"),
                     *[pct(d["scores"].get(k)) for k, _ in SCORES]])
        value = d["scores"].get("miou")
        classes.append("best" if len(sections) > 1 and value is not None and value == best.get(d.get("evaluation"))
                       else "")
    return table(["run", "features", "loss", "head", "iterations", "evaluation", *[f"{n} (%)" for _, n in SCORES]],
                 rows, left=2, row_classes=classes)


SEG_SECTION = SectionKind(
    "train-seg", "segmentation head", is_seg_run,
    lambda path, marker, anchor, shown, n_images: render_seg(path, marker or {}, anchor, shown),
    detect_rank=40, page_rank=40,
    chain_step="segmentation heads were trained on those features and scored per class group",
    compare=lambda sections: comparison([s for s in sections if s.data]) if any(s.data for s in sections) else "",
    compare_title="Segmentation heads compared",
    compare_note="Scores of each head on its first evaluation (eval-seg's test split when it ran, else training's "
                 "validation split); the best mIoU per evaluation is highlighted. Head, middle and tail are the class "
                 "groups by training pixel frequency.")
