"""The sliced hard forward (kept channels only) is the masked hard forward, computed cheaper:
same outputs, same gradients for weights and width logits, same BatchNorm statistics on the
kept channels, in train and eval mode."""

import warnings

import pytest
import torch
import torchvision

from s2hpruner import S2HPruner
from s2hpruner.app.models import create_model
from s2hpruner.core.layout import tune_hard_layout

CASES = [
    ("resnet20", lambda: create_model("resnet20", in_chans=1), (6, 1, 28, 28)),
    ("mobilenet_v3_small", lambda: create_model("mobilenet_v3_small"), (4, 3, 32, 32)),
    ("vgg11_bn_cifar", lambda: create_model("vgg11_bn_cifar"), (4, 3, 32, 32)),
    ("wrn16_4", lambda: create_model("wrn16_4", widen_factor=1), (4, 3, 32, 32)),
    ("densenet121", lambda: torchvision.models.densenet121(num_classes=10), (2, 3, 32, 32)),
    # channels_last: the layout of CPU training; narrow BatchNorms run in NCHW (sliced.py) and
    # depthwise weights get real channels_last strides, and mobilenet's last maps are 1x1
    ("resnet20_channels_last", lambda: create_model("resnet20", in_chans=1), (6, 1, 28, 28)),
    ("mobilenet_v3_small_channels_last", lambda: create_model("mobilenet_v3_small"),
     (4, 3, 32, 32)),
    # pruner.hard_layout overrides the model's layout for the sliced pass only
    ("resnet20_channels_last_layout_nchw", lambda: create_model("resnet20", in_chans=1),
     (6, 1, 28, 28)),
    ("mobilenet_v3_small_layout_channels_last", lambda: create_model("mobilenet_v3_small"),
     (4, 3, 32, 32)),
    # hard_nchw_norms=False: narrow BatchNorms stay in channels_last (tune_hard_layout's third)
    ("resnet20_channels_last+cl_norms", lambda: create_model("resnet20", in_chans=1),
     (6, 1, 28, 28)),
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def run(model, pruner, x, sliced, train):
    torch.manual_seed(1)  # same dropout masks in both paths
    model.train(train)
    weights = list(model.parameters())
    masks = pruner.mask_parameters()
    with pruner.mode("hard", sliced=sliced):
        out = model(x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
    grads = torch.autograd.grad(loss, weights + masks, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sliced_equals_masked(name, factory, shape, train):
    if train and name == "densenet121":
        pytest.skip("train-mode BatchNorm over 2 images of 1x1 maps amplifies float rounding")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = factory()
    for m in model.modules():  # dropout draws masks of another size when channels are sliced
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(*shape)
    name, _, norms = name.partition("+")
    name, _, layout = name.partition("_layout_")
    if name.endswith("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    pruner = S2HPruner(model, x[:1], target_flops=0.5, separate_hard_bn_stats=True)
    pruner.hard_layout = LAYOUTS.get(layout)
    pruner.hard_nchw_norms = norms != "cl_norms"
    expected_layout = layout or ("channels_last" if name.endswith("channels_last") else None)
    assert pruner.sliced_hard, pruner.unsliceable
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.normal_(0, 1.5)
    pruner.update_ranks()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = {k: v.clone() for k, v in pruner.hard_stats.state_dict().items()}

    out_m, grads_m = run(model, pruner, x, sliced=False, train=train)
    stats_masked = {k: {b: t.clone() for b, t in v.items()} for k, v in pruner.hard_stats.items()}
    model.load_state_dict(state)
    pruner.hard_stats.load_state_dict(stats)
    conv_inputs = []  # (is channels_last, is NCHW); a 1-channel or 1x1 input is both
    hooks = [
        m.register_forward_pre_hook(
            lambda m, inp: conv_inputs.append(
                (inp[0].is_contiguous(memory_format=torch.channels_last),
                 inp[0].is_contiguous())
            )
        )
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    out_s, grads_s = run(model, pruner, x, sliced=True, train=train)
    for h in hooks:
        h.remove()
    # the layout survives the sliced layers (no silent conversions)
    if expected_layout == "channels_last":
        assert all(cl for cl, _ in conv_inputs)
    elif expected_layout == "nchw":
        assert all(nchw for _, nchw in conv_inputs)

    # eval: the SPEC tolerance; train: batch statistics over ~100 concatenated BatchNorms
    # (DenseNet) accumulate float differences of the reordered sums to a few 1e-4
    scale = out_m.abs().max()
    assert (out_m - out_s).abs().max() <= (1e-3 if train else 1e-4) * scale
    # Compared as whole vectors (weights, then width logits): max-pool ties between nearly
    # equal values may route a tiny part of the gradient elsewhere when float sums are ordered
    # differently, and some entries (BN biases in train mode) are zero up to rounding.
    n_weights = len(list(model.parameters()))
    for part in (slice(0, n_weights), slice(n_weights, None)):
        gm = torch.cat([g.reshape(-1) for g in grads_m[part] if g is not None])
        gs = torch.cat([g.reshape(-1) for g in grads_s[part] if g is not None])
        assert gm.norm() > 0
        assert (gm - gs).norm() <= 1e-3 * gm.norm()
    # BatchNorm running statistics agree on every kept channel
    kept_sets = pruner.kept_channels()
    for g in pruner.groups:
        keep = torch.tensor(kept_sets[g.name])
        for piece in g.norms:
            idx = torch.tensor(piece.module_idxs)[
                torch.isin(torch.tensor(piece.root_idxs), keep)
            ]
            for buf in ("running_mean", "running_var"):
                a = stats_masked[piece.module_name][buf][idx]
                b = dict(pruner.hard_stats.items())[piece.module_name][buf][idx]
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (piece.module_name, buf)
    # the model's own (soft) statistics are untouched by hard forwards
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_sliced_forward_really_skips_pruned_channels():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    pruner = S2HPruner(model, x[:1], target_flops=0.35)
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.normal_(0, 1.5)
    counts = {}
    for sliced in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as counter, pruner.mode(
            "hard", sliced=sliced
        ):
            model(x)
        counts[sliced] = counter.get_total_flops()
    assert counts[True] == pytest.approx(float(pruner.flops("hard")) * 2, rel=0.01)
    assert counts[True] < 0.8 * counts[False]


def _pruner(model_name="resnet20"):
    torch.manual_seed(0)
    model = create_model(model_name, in_chans=1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    return model, S2HPruner(model, x[:1], target_flops=0.35, separate_hard_bn_stats=True), x


@pytest.mark.parametrize(
    ("faster", "nchw_norms"), [("nchw", True), ("channels_last", True), ("channels_last", False)]
)
def test_tune_hard_layout_keeps_the_faster_layout(monkeypatch, faster, nchw_norms):
    """The choice follows the timings: a fake clock makes one variant's passes cheaper."""
    import s2hpruner.core.layout as layout_module

    model, pruner, x = _pruner()
    pruner.hard_nchw_norms = not nchw_norms  # the tuning must set it either way
    fastest = (LAYOUTS[faster], nchw_norms)
    clock = [0.0]

    def fake_clock():
        clock[0] += 1.0 if (pruner.hard_layout, pruner.hard_nchw_norms) == fastest else 3.0
        return clock[0]

    monkeypatch.setattr(layout_module.time, "perf_counter", fake_clock)
    assert tune_hard_layout(pruner, x) == LAYOUTS[faster]
    assert (pruner.hard_layout, pruner.hard_nchw_norms) == fastest


def test_tune_hard_layout_has_no_side_effects():
    """Timing runs real training passes; weights, gradients, BatchNorm statistics (the
    model's and the hard network's) and the RNG must come out as they went in."""
    model, pruner, x = _pruner()
    model.train()
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.normal_(0, 1.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hard = {k: {b: t.clone() for b, t in v.items()} for k, v in pruner.hard_stats.items()}
    rng = torch.get_rng_state()
    layout = tune_hard_layout(pruner, x, repeats=1)
    assert layout in (torch.contiguous_format, torch.channels_last)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in pruner.hard_stats.items():
        for b, t in v.items():
            assert torch.equal(t, hard[k][b]), (k, b)
    assert all(p.grad is None for p in model.parameters())
    assert all(u.grad is None for u in pruner.mask_parameters())
    # and the statistics were really exercised: without the restore they would have moved
    with pruner.mode("hard"):
        model(x)
    assert any(not torch.equal(t, hard[k][b])
               for k, v in pruner.hard_stats.items() for b, t in v.items())


def test_strided_pointwise_weight_gradient():
    """ResNet shortcuts (1x1, stride 2) fed 2-7 kept channels in channels_last: PyTorch 2.14's
    CPU kernel gets their weight gradient wrong, so the sliced pass runs them in NCHW. The
    sliced gradients must equal the masked ones (and a finite difference)."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1).to(memory_format=torch.channels_last)
    x = torch.randn(6, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    pruner = S2HPruner(model, x[:1], target_flops=0.35)
    name = "layer2.0.shortcut.0"
    (stage1,) = [g for g in pruner.groups if name in {c.module_name for c in g.consumers}]
    with torch.no_grad():  # keep 5 of stage 1's 16 channels, everything else full
        for g, u in zip(pruner.groups, pruner.mask_parameters(), strict=True):
            u.fill_(-30.0)
            u[g.candidates.index(5) if g is stage1 else -1] = 30.0
    assert pruner.kept_widths()[stage1.name] == 5
    shortcut = dict(model.named_modules())[name]
    model.eval()  # running statistics: no batch-statistics rounding in the comparison
    grads = {}
    for sliced in (False, True):
        with pruner.mode("hard", sliced=sliced):
            out = model(x)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        grads[sliced] = torch.autograd.grad(loss, shortcut.weight)[0]
    assert grads[False].norm() > 0
    assert (grads[True] - grads[False]).norm() <= 1e-3 * grads[False].norm()


def test_tune_hard_layout_without_separate_hard_statistics():
    """DMP (and --no-separate-hard-bn-stats) keeps no hard BatchNorm statistics: layout
    tuning must still run and leave the model's statistics as they were."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    pruner = S2HPruner(model, x[:1], target_flops=0.35, separate_hard_bn_stats=False)
    assert pruner.hard_stats is None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert tune_hard_layout(pruner, x, repeats=1) in (torch.contiguous_format, torch.channels_last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "masked"])
def test_a_forward_that_raises_leaves_the_models_own_tensors(sliced):
    """A layer that raises mid-forward (a user's shape check, an out-of-memory error) must not
    leave the sliced or mask-folded tensors swapped in: the next forward, a checkpoint or the
    export would see them."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    pruner = S2HPruner(model, x[:1], target_flops=0.35)
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.normal_(0, 1.5)
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    failing = model.layer2[0].bn1  # a sliced and masked BatchNorm in the middle of the net

    def fail(*args):
        raise RuntimeError("raised inside the layer")

    failing.forward = fail
    with pytest.raises(RuntimeError, match="inside the layer"), pruner.mode("hard", sliced=sliced):
        model(x)
    del failing.forward
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys()
    assert [n for n, t in tensors.items() if now[n] is not t] == []
    with torch.no_grad():
        model.eval()
        assert model(x).shape == (2, 10)  # the full model runs again


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_sliced_weights_follow_the_models_layout(layout):
    """Without ``pruner.hard_layout``, every sliced 4-D weight takes the model's layout. A
    1x1 or depthwise weight's own strides cannot tell (``is_contiguous`` reads both), and
    reading them made an NCHW resnet20's grey stem and mobilenet's depthwise and 1x1 convs
    run channels_last inside an NCHW network: a layout conversion at each of them. (Strided
    1x1 convs run NCHW on the CPU whatever the layout, ``_strided_pointwise_on_cpu``, and
    depthwise convs channels_last, the faster kernel here.)"""
    from s2hpruner.core.measure import layout_of
    from s2hpruner.core.sliced import _strided_pointwise_on_cpu

    for name, shape in (("resnet20", (2, 1, 28, 28)), ("mobilenet_v3_small", (2, 3, 32, 32))):
        torch.manual_seed(0)
        model = create_model(name, in_chans=shape[1])
        model.to(memory_format=LAYOUTS[layout])
        pruner = S2HPruner(model, torch.zeros(shape), target_flops=0.5)
        seen = {}

        def record(module, inputs, key, seen=seen):
            seen[key] = layout_of(module.weight)

        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        exempt = {n for n, m in convs if _strided_pointwise_on_cpu(m)}  # NCHW: a oneDNN bug
        exempt |= {n for n, m in convs if m.groups > 1 and m.groups == m.in_channels}  # CL
        # weights is_contiguous reads as both layouts (the stem's, 1x1, depthwise)
        both = [n for n, m in convs if n not in exempt and m.weight.is_contiguous()
                and m.weight.is_contiguous(memory_format=torch.channels_last)]  # fmt: skip
        assert both, name
        with torch.no_grad(), pruner.mode("hard", sliced=True):
            # after the sliced pass's own pre-hooks, which swap the sliced weights in
            handles = [m.register_forward_pre_hook(lambda m, i, k=n: record(m, i, k))
                       for n, m in convs]  # fmt: skip
            model(torch.randn(shape))
            for h in handles:
                h.remove()
        wrong = {k: v for k, v in seen.items()
                 if v not in (None, LAYOUTS[layout]) and k not in exempt}  # fmt: skip
        assert not wrong, (name, wrong)
        assert any(seen[n] == LAYOUTS[layout] for n in both), name
        depthwise = [n for n, m in convs if m.groups > 1 and m.groups == m.in_channels]
        for n in depthwise:  # a 3x3 depthwise weight's strides tell its layout
            assert seen[n] == torch.channels_last, (name, n, seen[n])
