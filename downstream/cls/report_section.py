"""A classification head run (`train-cls`, evaluated by `eval-cls`) in the report: accuracy across the
test-agnostic distributions (forward-LT → uniform → backward-LT and Dirichlet draws), their means, accuracy
on the whole test set, and the training curves.

Read from the run folder: ``config.json``, ``metrics.json`` / ``eval-*/metrics.json`` (with their
``distributions`` rows), ``curves.png``.
"""

from __future__ import annotations

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

MAIN_VARIANTS = ("default", "tta")


def is_cls_run(path: Path, saved: dict | None) -> bool:
    """A train-cls run: marked so, or (before runs carried a kind) a config with labels and a method."""
    if saved and saved.get("kind"):
        return saved["kind"] in ("train-cls", "cls")
    config = (saved or {}).get("config") or {}
    return bool(saved) and "method" in config and "labels" in config


def evaluations(path: Path) -> list[tuple[str, dict]]:
    """(label, metrics) of every evaluation with test-agnostic rows: ``eval-*`` folders, then the run's own."""
    found = []
    for folder in sorted(path.glob("eval-*")):
        m = read_json_or(folder / "metrics.json")
        if isinstance(m, dict) and m.get("distributions"):
            found.append((f"{str(m.get('split') or folder.name.removeprefix('eval-')).rstrip('/')} (eval-cls)", m))
    m = read_json_or(path / "metrics.json")
    if isinstance(m, dict) and m.get("distributions"):
        found.append((f"{str(m.get('split') or 'test').rstrip('/')} (training)", m))
    return found


def accuracy_chart(metrics: dict, title: str) -> bytes:
    """Accuracy per test distribution: forward-LT → uniform → backward-LT as lines, Dirichlet draws beside them."""
    plt = pyplot()
    rows = metrics["distributions"]
    shifted = [r for r in rows if not str(r.get("kind", "")).startswith("dirichlet")]
    dirichlet = [r for r in rows if str(r.get("kind", "")).startswith("dirichlet")]
    variants = list((rows[0].get("accuracy") or {}) if rows else [])
    fig, axes = plt.subplots(1, 2 if dirichlet else 1, figsize=(10.5 if dirichlet else 6.5, 3.3), squeeze=False,
                             gridspec_kw={"width_ratios": [11, 8] if dirichlet else [1]})
    for v in variants:
        style = {"lw": 2.2} if v in MAIN_VARIANTS else {"lw": 1, "ls": "--", "alpha": 0.7}
        axes[0, 0].plot(range(len(shifted)), [100 * (r["accuracy"].get(v) or 0) for r in shifted], marker="o",
                        label=v, **style)
        if dirichlet:
            axes[0, 1].plot(range(len(dirichlet)), [100 * (r["accuracy"].get(v) or 0) for r in dirichlet], marker="o",
                            ls="-" if v in MAIN_VARIANTS else "none", label=v)
    axes[0, 0].set_xticks(range(len(shifted)), [str(r.get("name", "")) for r in shifted], rotation=55, ha="right",
                          fontsize=7)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, 0].set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    if dirichlet:
        axes[0, 1].set_xticks(range(len(dirichlet)), [str(r.get("name", "")) for r in dirichlet], rotation=55,
                              ha="right", fontsize=7)
        axes[0, 1].set_title("Dirichlet test priors", fontsize=9)
    for ax in axes[0]:
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def render_cls(path: Path, saved: dict, anchor: str, shown_as: str) -> Section:
    """The section of one train-cls run folder."""
    config = saved.get("config") or {}
    evals = evaluations(path)
    stores = ", ".join(Path(str(s)).name for s in config.get("features") or []) or "?"
    layers = config.get("layers") or []
    parts = [f"<p class='sub'>features <code>{esc(stores + (': ' + ', '.join(map(str, layers)) if layers else ''))}"
             f"</code> · method <b>{esc(config.get('method', '?'))}</b> · head {esc(config.get('head') or 'default')}"
             f" · fusion {esc(config.get('fusion', '?'))} · optimiser {esc(config.get('optim', '?'))} · "
             f"{esc(config.get('epochs', '?'))} epochs, seed {esc(config.get('seed', '?'))}</p>"]
    overview = "no test scores"
    if evals:
        label, metrics = evals[0]
        means = metrics.get("mean_accuracy") or {}
        full = metrics.get("full_test") or {}
        rows = [[f"<b>{esc(v)}</b>", pct(means.get(v)), pct((metrics.get("mean_accuracy_sade") or {}).get(v)),
                 pct((metrics.get("mean_accuracy_dirichlet") or {}).get(v))] for v in means]
        parts.append(table(["prediction", "mean over all distributions (%)", "forward/uniform/backward (%)",
                            "Dirichlet (%)"], rows))
        parts.append(note(f"{label}: {metrics.get('images', '?')} test images; whole test set accuracy "
                          f"{pct(full.get('accuracy'))}%, class-mean {pct(full.get('class_mean_accuracy'))}%. The test "
                          "set is resampled to each label distribution (forward-LT like training, uniform, backward-LT "
                          "reversed, Dirichlet draws) to show how the head holds up when the test prior moves."))
        chart = accuracy_chart(metrics, f"accuracy per test distribution, {label}")
        parts.append(img(chart, "accuracy per distribution"))
        dist = metrics["distributions"]
        shown = [v for v in MAIN_VARIANTS if v in (dist[0].get("accuracy") or {})]
        parts.append(table(["distribution", "images", *[f"{v} (%)" for v in shown]],
                           [[esc(r.get("name", "")), esc(r.get("images", "")),
                             *[pct((r.get("accuracy") or {}).get(v)) for v in shown]] for r in dist]))
        overview = f"{label}: mean accuracy {pct(means.get('default'))}%" + (
            f" (tta {pct(means['tta'])}%)" if "tta" in means else "")
    else:
        parts.append(note("No test scores yet: train with --test-split / --test-labels, or run eval-cls.", "warn"))
    if (path / "curves.png").is_file():
        parts.append("<h3>Training</h3>" + img_file(path / "curves.png", "training curves"))
    return Section("train-cls", f"Classification head · {shown_as}", anchor, "\n".join(parts), overview)


CLS_SECTION = SectionKind(
    "train-cls", "classification head", is_cls_run,
    lambda path, marker, anchor, shown, n_images: render_cls(path, marker or {}, anchor, shown),
    detect_rank=50, page_rank=50,
    chain_step="classification heads were scored on test sets resampled to shifted label distributions")
