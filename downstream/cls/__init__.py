"""Classification heads on pooled stored features (`difffeat train-cls` / `eval-cls`).

One concept per module: `config` (what defines a run), `profile` (a data set's released settings by name),
`labels` (the key,label CSV and classes), `data` (pooled features of a split), `model` (norm → fusion → trunk →
head), `objective` (methods and optimizers by name), `dirmixe`, `drauc` (DRAUC's training step), `reconboost`,
`neural_collapse` (frame heads and NC metrics), `label_shift` (the evaluation protocol), `train` (the loop),
`evaluation` (scores, many / medium / few shots, eval-cls), `parallel` (several processes), `cli` (the
commands).

    from downstream.cls import ClsTrainConfig, train_cls, eval_cls
    run = train_cls(ClsTrainConfig(features=["runs/features"], labels="labels.csv", split="train/",
                                   test_split="test/", method="dirmixe", out="runs/cls"))
"""

# Names load on first use: the CLI reads the configs at start-up and must not pull in torch.
from difffeat.lazy import lazy_getattr

_LAZY = {
    "ClsTrainConfig": "downstream.cls.config",
    "EvalClsConfig": "downstream.cls.config",
    "DirMixEConfig": "downstream.cls.config",
    "AggregationConfig": "downstream.cls.config",
    "ReconBoostConfig": "downstream.cls.config",
    "read_labels": "downstream.cls.labels",
    "write_labels_csv": "downstream.cls.labels",
    "load_class_names": "downstream.cls.labels",
    "ClsData": "downstream.cls.data",
    "SourceSpec": "downstream.cls.data",
    "load_split": "downstream.cls.data",
    "pool": "downstream.cls.data",
    "ClsModel": "downstream.cls.model",
    "WeightedSources": "downstream.cls.model",
    "Objective": "downstream.cls.objective",
    "METHODS": "downstream.cls.objective",
    "OPTIMIZERS": "downstream.cls.objective",
    "shifted_test_sets": "downstream.cls.label_shift",
    "profile_fields": "downstream.cls.profile",
    "shot_groups": "downstream.cls.evaluation",
    "neural_collapse_metrics": "downstream.cls.neural_collapse",
    "train_cls": "downstream.cls.train",
    "eval_cls": "downstream.cls.evaluation",
    "evaluate": "downstream.cls.evaluation",
    "load_run": "downstream.cls.evaluation",
    "summary_line": "downstream.cls.evaluation",
}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = list(_LAZY)
