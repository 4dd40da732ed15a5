"""Measure neural collapse in any PyTorch network with one call: :func:`measure_model`.

``measure_model(model, train_loader)`` streams the training set through ``model`` (eval mode,
``torch.no_grad()``), catching features with a forward hook (:class:`nc_lib.features.FeatureTap`)
and feeding them batch by batch into :class:`nc_lib.metrics.CollapseAccumulator`, then makes the
second, per-sample pass (:class:`nc_lib.metrics.SampleAccumulator`: NCC mismatch and accuracy,
cosine margins) and, with a test loader, the test pass against the *training* class means. These are
the passes and the measurements of the kit's engine (:func:`nc_lib.features.measure`; Papyan, Han &
Donoho 2020, REFERENCE.md section 2), on a network the kit did not build.

What is measured, by default:

* features h: the input of the model's last ``nn.Linear`` (for a kit :class:`nc_lib.models.Classifier`,
  the input of its head), i.e. the penultimate features of torchvision's ResNet, VGG, DenseNet, ViT;
* classifier (W, b): that layer (W is C x d, logits ``h @ W.T + b``), or the kit head's ``classifier()``.

``layer=`` names another module of ``model.named_modules()``, whose *output* becomes h;
``classifier=`` names another head (a module name, a module, or a ``(W, b)`` pair), or ``None``
for the measurements of features and labels only.

**Layers.** ``layers=[names]`` or ``layers="all"`` adds, from the same passes, the measurements
that need only features and labels (within-class variability NC1 = Tr(Sigma_W Sigma_B^+)/C, the
means' equinorm / equiangularity / ETF distances, NCC accuracy) at the output of each named module.
``"all"`` is every block: the non-container children of the model's ``nn.Sequential`` containers that
hold parameters (torchvision ResNet: ``layer1.0`` ... ``layer4.1``; VGG: every conv, batch norm and
linear layer), without the classifier itself. A convolutional map (B x channels x spatial...) is
reduced by global average pooling over its spatial positions by default (``pool="avg"``): the reduction
the networks themselves apply before their classifier (ResNet, DenseNet, and Papyan et al.'s
penultimate features are global-average-pooled maps), which makes the last block's value that of the
penultimate features; ``pool="flatten"`` keeps every coordinate instead (a p x p scatter with
p = channels x positions: only for small maps).

Cost: one forward per batch and pass; the accumulators' updates are one Gram product per batch.
``benchmarks/bench_measure_model.py`` measures the overhead over a plain forward pass.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import resolve_device
from .features import FeatureTap, _keep_precision, measure_passes
from .metrics import PAPER_NAMES, CollapseAccumulator
from .validation import check_choice

POOLS = ("avg", "flatten")
#: the per-layer measurements (features and labels only), in table order
LAYER_KEYS = ("within_class_variability", "equinorm_means", "equiangularity_means", "max_angle_means",
              "means_etf_distance", "means_nearest_etf_distance", "ncc_accuracy")


# --------------------------------------------------------------------------- what to hook
def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The (name, module) of the last ``nn.Linear`` in ``model.named_modules()`` order, or None."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def find_module(model: nn.Module, name: str, what: str = "layer") -> nn.Module:
    """The module ``name`` of ``model.named_modules()``; a ValueError listing the close names if none."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    hint = f"close names: {close}" if close else f"the model's modules include {names[:12]}"
    raise ValueError(f"{what}={name!r} is not a module of the model ({hint}); names are those of "
                     "model.named_modules().")


def block_names(model: nn.Module, exclude: Sequence[nn.Module] = ()) -> list[str]:
    """``layers="all"``: the non-container children of every ``nn.Sequential`` / ``nn.ModuleList`` of
    ``model`` that hold parameters and lie in no block already listed, in definition order, without ``exclude``;
    the model's direct children with parameters when it has no such container."""
    containers = (nn.Sequential, nn.ModuleList)
    skip = {id(m) for m in exclude}
    out = []
    for name, m in model.named_modules():
        if isinstance(m, containers):
            for child_name, child in m.named_children():
                if isinstance(child, containers) or id(child) in skip:
                    continue
                full = f"{name}.{child_name}" if name else child_name
                inside = any(full.startswith(f"{o}.") for o in out)  # e.g. a ResNet block's downsample
                if any(True for _ in child.parameters()) and not inside:
                    out.append(full)
    if not out:
        out = [n for n, c in model.named_children() if id(c) not in skip and any(True for _ in c.parameters())]
    return out


def pooled(t: Tensor, pool: str) -> Tensor:
    """B x d features of a module's output: a map (B x channels x spatial...) averaged over its spatial
    positions (``"avg"``, global average pooling) or flattened (``"flatten"``); B x d stays as it is."""
    if t.dim() <= 2:
        return t.reshape(t.shape[0], -1)
    return t.flatten(2).mean(2) if pool == "avg" else t.flatten(1)


# --------------------------------------------------------------------------- input checks
def checked_batches(loader: Iterable, num_classes: int | None, name: str) -> Iterator[tuple[Tensor, Tensor]]:
    """The (input, label) batches of ``loader``, checked before they reach the device: two items, a
    tensor input, 1-D integer labels in [0, num_classes)."""
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            what = f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
            raise ValueError(f"{name} must yield (input, label) pairs; batch {i} is {what}. Wrap the loader, "
                             "e.g. ((x, y) for x, y, *_ in loader).")
        x, y = batch
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must yield (input, label) pairs with a tensor input; batch {i} has a "
                             f"{type(x).__name__}.")
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must yield integer class labels, one per input; batch {i} has labels of "
                             f"shape {tuple(y.shape)} and dtype {y.dtype} for {x.shape[0]} inputs.")
        if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels of {name} must lie in [0, num_classes={num_classes}); batch {i} has labels "
                             f"in [{int(y.min())}, {int(y.max())}]. Pass the right num_classes or fix the labels.")
        yield x, y


class _CheckedLoader:
    """``loader`` re-checked by :func:`checked_batches` on every pass, with a tqdm.auto bar when ``progress``."""

    def __init__(self, loader: Iterable, num_classes: int, name: str, progress: bool) -> None:
        self.loader, self.num_classes, self.name, self.progress = loader, num_classes, name, progress

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches: Iterable = checked_batches(self.loader, self.num_classes, self.name)
        if self.progress:
            from tqdm.auto import tqdm

            total = len(self.loader) if hasattr(self.loader, "__len__") else None
            batches = tqdm(batches, total=total, desc=self.name, leave=False, unit="batch")
        return iter(batches)


def _infer_num_classes(loader: Iterable) -> int:
    """C from the loader's dataset (``num_classes``, ``classes``, ``targets``), else max label + 1 over one
    pass of the labels."""
    ds = getattr(loader, "dataset", None)
    if ds is not None:
        if isinstance(getattr(ds, "num_classes", None), int):
            return int(ds.num_classes)
        if getattr(ds, "classes", None) is not None:
            return len(ds.classes)
        if getattr(ds, "targets", None) is not None:
            return int(torch.as_tensor(ds.targets).max()) + 1
    top = -1
    for _, y in checked_batches(loader, None, "train_loader"):
        top = max(top, int(y.max()) if len(y) else -1)
    if top < 1:
        raise ValueError("num_classes could not be inferred (fewer than 2 classes in train_loader); pass num_classes.")
    return top + 1


# --------------------------------------------------------------------------- the result
@dataclass
class CollapseMeasurement:
    """What :func:`measure_model` returns. ``values``: every measurement under its kit name (the keys of
    :func:`nc_lib.features.measure`); ``layers``: layer name -> its feature-only measurements;
    ``result["key"]`` reads ``values``; :meth:`paper_values` names them as each paper does
    (:data:`nc_lib.metrics.PAPER_NAMES`); it prints as a table, and :meth:`to_dict` is a plain dict."""

    values: dict[str, float]
    num_classes: int
    features: str
    classifier: str | None
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    pool: str = "avg"

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def keys(self) -> Any:
        return self.values.keys()

    def paper_values(self) -> dict[str, dict[str, float]]:
        """paper -> {the paper's label: value}, for the measurements this result holds."""
        return {paper: {label: self.values[k] for label, k in names.items() if k in self.values}
                for paper, names in PAPER_NAMES.items()}

    def to_dict(self) -> dict[str, Any]:
        """A plain dict: every kit key, plus ``"paper_names"`` (paper -> label -> value), ``"layers"``,
        ``"num_classes"``, ``"features"``, ``"classifier"``, ``"pool"``."""
        return {**self.values, "paper_names": self.paper_values(), "layers": {k: dict(v) for k, v in self.layers.items()},
                "num_classes": self.num_classes, "features": self.features, "classifier": self.classifier,
                "pool": self.pool}

    def _rows(self) -> list[tuple[str, str, float]]:
        labels: dict[str, list[str]] = {}
        for paper, names in PAPER_NAMES.items():
            for label, k in names.items():
                labels.setdefault(k, []).append(f"{paper}: {label}")
        return [(k, "; ".join(labels.get(k, [])), v) for k, v in self.values.items()]

    def __str__(self) -> str:
        head = (f"neural collapse of {self.num_classes} classes; features: {self.features}; "
                f"classifier: {self.classifier or 'none'}")
        rows = self._rows()
        w = max(len(k) for k, _, _ in rows)
        lines = [head] + [f"  {k:<{w}}  {v:>12.6g}  {p}" for k, p, v in rows]
        if self.layers:
            cols = [k for k in LAYER_KEYS if any(k in d for d in self.layers.values())]
            lw = max(len(n) for n in self.layers)
            lines.append(f"by layer ({self.pool} pooling):")
            lines.append(f"  {'layer':<{lw}}  " + "  ".join(f"{c[:14]:>14}" for c in cols))
            for n, d in self.layers.items():
                lines.append(f"  {n:<{lw}}  " + "  ".join(f"{d.get(c, float('nan')):>14.6g}" for c in cols))
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{v:.6g}</td><td>{html.escape(p)}</td></tr>"
                       for k, p, v in self._rows())
        out = (f"<p>neural collapse of {self.num_classes} classes; features: <code>{html.escape(self.features)}"
               f"</code>; classifier: <code>{html.escape(self.classifier or 'none')}</code></p>"
               f"<table><tr><th>measurement</th><th>value</th><th>paper names</th></tr>{rows}</table>")
        if self.layers:
            cols = [k for k in LAYER_KEYS if any(k in d for d in self.layers.values())]
            body = "".join("<tr><td><code>" + html.escape(n) + "</code></td>"
                           + "".join(f"<td>{d.get(c, float('nan')):.4g}</td>" for c in cols) + "</tr>"
                           for n, d in self.layers.items())
            out += (f"<p>by layer ({self.pool} pooling)</p><table><tr><th>layer</th>"
                    + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{body}</table>")
        return out

    def figure(self, key: str = "within_class_variability") -> Any:
        """A plotly figure of ``key`` (default NC1) against depth (:func:`nc_lib.plots.layer_figure`)."""
        from .plots import layer_figure

        if not self.layers:
            raise ValueError("this result has no per-layer measurements; measure with layers=[...] or layers='all'.")
        return layer_figure(self.layers, key)


# --------------------------------------------------------------------------- the passes
def _classifier_of(model: nn.Module, classifier: Any) -> tuple[str | None, Any]:
    """(label, W-b source) for ``classifier``: None; a module name; a module (nn.Linear or kit head);
    or a (W, b) pair."""
    if classifier is None:
        return None, None
    if isinstance(classifier, str):
        return classifier, find_module(model, classifier, "classifier")
    if isinstance(classifier, nn.Module):
        return type(classifier).__name__, classifier
    if isinstance(classifier, (tuple, list)) and len(classifier) == 2:
        return "(W, b)", tuple(classifier)
    raise ValueError("classifier must be 'auto', None, a module name, an nn.Linear (or a kit head) or a (W, b) "
                     f"pair; got {type(classifier).__name__}.")


def _weights(source: Any) -> tuple[Tensor | None, Tensor | None]:
    if source is None:
        return None, None
    if isinstance(source, tuple):
        W, b = source
    elif isinstance(source, nn.Linear):
        W, b = source.weight, source.bias
    elif hasattr(source, "classifier"):
        W, b = source.classifier()
    else:
        raise ValueError(f"classifier {type(source).__name__} is neither an nn.Linear nor a head with classifier().")
    W = _keep_precision(torch.as_tensor(W).detach())
    return W, None if b is None else _keep_precision(torch.as_tensor(b).detach())


@torch.no_grad()
def measure_model(model: nn.Module, train_loader: Iterable, test_loader: Iterable | None = None,
                  num_classes: int | None = None, layer: str | None = None, classifier: Any = "auto",
                  layers: Sequence[str] | str | None = None, device: str = "auto", *, pool: str = "avg",
                  amp: bool = False, progress: bool = True) -> CollapseMeasurement:
    """Every collapse measurement of ``model`` on ``train_loader`` (and ``test_loader``): see the module doc.

    ``layer``: a module name whose output gives the features (default: the input of the last
    ``nn.Linear``, or of a kit model's head). ``classifier``: ``"auto"`` (that last linear layer / kit
    head, when its input width matches the features), None (features only), a module name, a module,
    or ``(W, b)``. ``layers``: names or ``"all"``, feature-only measurements at each (``pool``: ``"avg"``
    or ``"flatten"`` for maps). ``device``: ``"auto"`` keeps the model where it is; another value moves
    it there. ``amp``: bfloat16 autocast on CUDA. ``num_classes``: default from the classifier's rows,
    else the loader's dataset, else the labels. Returns a :class:`CollapseMeasurement`.
    """
    pool = check_choice("pool", pool, POOLS)
    if device == "auto":
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    else:
        dev = resolve_device(device)
        model.to(dev)
    kit_head = getattr(model, "head", None) if hasattr(getattr(model, "head", None), "classifier") else None
    linear = last_linear(model)
    if layer is None:
        if kit_head is not None:
            tap_module, tap_output, feat_label = kit_head, False, "input of head"
            auto_cls: tuple[str | None, Any] = ("head", kit_head)
        elif linear is not None:
            tap_module, tap_output, feat_label = linear[1], False, f"input of {linear[0]}"
            auto_cls = (linear[0], linear[1])
        else:
            raise ValueError("the model has no nn.Linear layer, so measure_model cannot find its penultimate features; "
                             "name the module whose output holds them with layer=, e.g. layer='avgpool'.")
    else:
        tap_module, tap_output, feat_label = find_module(model, layer), True, f"output of {layer}"
        auto_cls = ("head", kit_head) if kit_head is not None else (linear if linear is not None else (None, None))
    if isinstance(classifier, str) and classifier == "auto":
        cls_label, cls_source = auto_cls
    else:
        cls_label, cls_source = _classifier_of(model, classifier)
    W, b = _weights(cls_source)
    if num_classes is None:
        num_classes = int(W.shape[0]) if W is not None else _infer_num_classes(train_loader)
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be a list of module names or 'all'; got {layers!r}.")
        excluded = [m for m in (cls_source,) if isinstance(m, nn.Module)]
        layer_names = block_names(model, excluded)
    else:
        layer_names = list(layers or [])
    layer_modules = {n: find_module(model, n, "layers") for n in layer_names}

    def transform(t: Tensor) -> Tensor:
        return pooled(t, pool)

    def classifier_of(acc: CollapseAccumulator) -> tuple[Tensor | None, Tensor | None]:
        nonlocal cls_label
        if acc.p is not None and W is not None and W.shape[1] != acc.p:
            if isinstance(classifier, str) and classifier == "auto":
                cls_label = None  # a named layer the head does not read: features only
                return None, None
            raise ValueError(f"the classifier {cls_label!r} has {W.shape[1]} input features but the features "
                             f"({feat_label}) have {acc.p}.")
        return (None, None) if W is None else (W.to(dev), None if b is None else b.to(dev))

    def checked(loader: Iterable | None, name: str) -> Iterable | None:
        return None if loader is None else _CheckedLoader(loader, num_classes, name, progress)

    taps = {n: FeatureTap(model, m, output=True, transform=transform) for n, m in layer_modules.items()}
    out, per_layer, _ = measure_passes(
        model, checked(train_loader, "train_loader"), checked(test_loader, "test_loader"), num_classes, dev,
        tap=FeatureTap(model, tap_module, output=tap_output, transform=transform), classifier=classifier_of,
        layer_taps=taps, train_sample_pass=True, amp=amp)
    return CollapseMeasurement(out, num_classes, feat_label, cls_label, per_layer, pool)
