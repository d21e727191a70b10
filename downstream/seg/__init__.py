"""Segmentation heads on stored features: one module per concept.

    config       SegTrainConfig, HeadConfig, SegEvalConfig (the CLI flags come from their fields)
    classes      SegClasses, load_classes, resolve_classes
    masks        MaskFinder, read_mask (mask files, confined to the mask root)
    data         FeatureSpec, SegDataset, collate
    model        FeatureNorm, VariantSum, PixelMLPEnsemble, MultiScaleConvHead, SegModel
    objective    the losses by name (LOSSES), class weights, memory bank use: SegObjective
    memory_bank  AUCSeg's tail memory bank (image and feature space)
    train        train_seg: the loop on downstream.engine and the run spine
    evaluate     evaluate, eval_seg, load_run, group_summary
    metrics      confusion matrix, mIoU overall / head / middle / tail
    summary      mean ± std over seeds of several runs (python -m downstream.seg.summary)
    pixel_store  the raw-pixel baseline store (python -m downstream.seg.pixel_store)
    cli          difffeat train-seg / eval-seg

    from downstream.seg import SegTrainConfig, train_seg, eval_seg
"""

# Names load on first use: difffeat's CLI imports `downstream.seg.cli`, which must not pull in torch at start-up.
from difffeat.lazy import lazy_getattr

_LAZY = {
    "SegTrainConfig": "downstream.seg.config",
    "SegEvalConfig": "downstream.seg.config",
    "HeadConfig": "downstream.seg.config",
    "SegClasses": "downstream.seg.classes",
    "load_classes": "downstream.seg.classes",
    "resolve_classes": "downstream.seg.classes",
    "MaskFinder": "downstream.seg.masks",
    "read_mask": "downstream.seg.masks",
    "FeatureSpec": "downstream.seg.data",
    "SegDataset": "downstream.seg.data",
    "FeatureNorm": "downstream.seg.model",
    "VariantSum": "downstream.seg.model",
    "PixelMLPEnsemble": "downstream.seg.model",
    "MultiScaleConvHead": "downstream.seg.model",
    "SegModel": "downstream.seg.model",
    "LOSSES": "downstream.seg.objective",
    "register_loss": "downstream.seg.objective",
    "SegObjective": "downstream.seg.objective",
    "build_objective": "downstream.seg.objective",
    "FeatureMemoryBank": "downstream.seg.memory_bank",
    "ImageMemoryBank": "downstream.seg.memory_bank",
    "train_seg": "downstream.seg.train",
    "eval_seg": "downstream.seg.evaluate",
    "load_run": "downstream.seg.evaluate",
    "group_summary": "downstream.seg.evaluate",
    "SegMetrics": "downstream.seg.metrics",
    "confusion_matrix": "downstream.seg.metrics",
    "segmentation_scores": "downstream.seg.metrics",
    "summarize_runs": "downstream.seg.summary",
    "write_pixel_store": "downstream.seg.pixel_store",
}

# Not `evaluate`: once its module is imported, the package attribute of that name is the module.
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = list(_LAZY)
