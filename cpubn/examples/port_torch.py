"""Port a trained PyTorch CNN's BatchNorms to cpubn and check its outputs against PyTorch.

A small PyTorch network of three Conv-BN-ReLU blocks is trained for a few SGD steps on
synthetic 8x8 images (so that its running statistics are far from 0 and 1), put in eval
mode, and run in NumPy with its BatchNorms ported three ways:

1. **state dict**: ``cpubn.BatchNorm`` layers filled from the whole model's
   ``state_dict()`` in one ``cpubn.load_state_dicts`` call, each followed by a ReLU;
2. **fused**: ``cpubn.BatchNorm.from_torch(module, activation="relu")`` per BatchNorm,
   hyperparameters included, BN and ReLU in one pass;
3. **folded**: the ported BatchNorms folded into the convolutions before them with
   ``cpubn.fold_into_conv``; only the ReLU remains;

each in channels-first (NCHW, ``axis=1``) and channels-last (NHWC, ``axis=-1``) layout.
The table gives each variant's largest logit difference from PyTorch's eval output and
whether the predictions agree.  It needs PyTorch (``pip install torch``):

    python -m cpubn.examples.port_torch [--steps 30] [--seed 0]
"""
import argparse
import sys
from dataclasses import dataclass

import numpy as np

import cpubn
from cpubn.examples import nn

CHANNELS = (8, 16, 16)
IMAGE_SIZE = 8
CLASSES = 10
BATCH_SIZE = 32
VARIANTS = ("state dict", "fused", "folded")
# float32 everywhere; the NumPy convolution sums in another order than PyTorch's.
TOLERANCE = 1e-4


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("this example ports a PyTorch model: pip install torch") from None
    return torch


def build_torch_model(seed=0):
    """conv3x3(1->8)-BN-ReLU, conv3x3(8->16)-BN-ReLU, avgpool2, conv3x3(16->16)-BN-ReLU,
    avgpool2, flatten, Linear(64->10).  Convolutions before a BatchNorm have no bias."""
    torch = _import_torch()
    torch.manual_seed(seed)
    layers = []
    inputs = 1
    for index, channels in enumerate(CHANNELS):
        layers += [torch.nn.Sequential(
            torch.nn.Conv2d(inputs, channels, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(channels), torch.nn.ReLU())]
        if index > 0:
            layers.append(torch.nn.AvgPool2d(2))
        inputs = channels
    size = IMAGE_SIZE // 4
    layers += [torch.nn.Flatten(), torch.nn.Linear(CHANNELS[-1] * size * size, CLASSES)]
    return torch.nn.Sequential(*layers)


def synthetic_images(n, rng):
    """(images (n, 1, 8, 8) float32, labels): ten random prototypes plus noise."""
    prototypes = np.random.default_rng(1000).random((CLASSES, 1, IMAGE_SIZE, IMAGE_SIZE))
    labels = rng.integers(0, CLASSES, n)
    images = prototypes[labels] * 3 + 1 + 0.5 * rng.standard_normal((n, 1, IMAGE_SIZE, IMAGE_SIZE))
    return images.astype(np.float32), labels


def train_torch_model(model, steps, seed=0):
    """A few SGD steps in training mode: the running statistics move away from 0 / 1."""
    torch = _import_torch()
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        images, labels = synthetic_images(BATCH_SIZE, rng)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)),
                                                 torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _numpy_conv(conv, channels_last, weight=None, bias=None):
    layer = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                      np.random.default_rng(0), padding=conv.padding[0],
                      channels_last=channels_last, bias=bias is not None)
    layer.weight[...] = conv.weight.detach().numpy() if weight is None else weight
    if bias is not None:
        layer.bias[...] = bias
    return layer


def port(model, variant, channels_last=False):
    """The eval-mode torch model as a list of NumPy layers (see the module docstring)."""
    torch = _import_torch()
    axis = -1 if channels_last else 1
    blocks = [(name, module) for name, module in model.named_children()
              if isinstance(module, torch.nn.Sequential)]
    # 1. state dict: layers built with the model's hyperparameters (here the defaults),
    #    then every BatchNorm's arrays from the whole-model state dict in one call.
    state_dict_bns = {f"{name}.1": cpubn.BatchNorm(block[1].num_features, axis=axis)
                      for name, block in blocks}
    cpubn.load_state_dicts(state_dict_bns, model.state_dict())
    layers = []
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Sequential):            # conv, BN, ReLU
            conv, bn = module[0], module[1]
            if variant == "state dict":
                layers += [_numpy_conv(conv, channels_last), state_dict_bns[f"{name}.1"],
                           nn.ReLU()]
            elif variant == "fused":
                # 2. everything from the module: eps, momentum, state, eval mode.
                layers += [_numpy_conv(conv, channels_last),
                           cpubn.BatchNorm.from_torch(bn, axis=axis, activation="relu")]
            else:
                # 3. folded into the convolution's weight (and a new bias).
                weight, bias = cpubn.fold_into_conv(conv.weight.detach().numpy(), None,
                                                    cpubn.BatchNorm.from_torch(bn))
                layers += [_numpy_conv(conv, channels_last, weight, bias), nn.ReLU()]
        elif isinstance(module, torch.nn.AvgPool2d):
            layers.append(nn.AvgPool2d(channels_last))
        elif isinstance(module, torch.nn.Flatten):
            layers.append(nn.Flatten(channels_last))           # (C, H, W) order, as torch's
        elif isinstance(module, torch.nn.Linear):
            linear = nn.Linear(module.in_features, module.out_features,
                               np.random.default_rng(0), 0.0)
            linear.weight[...] = module.weight.detach().numpy().T   # x @ W convention
            linear.bias[...] = module.bias.detach().numpy()
            layers.append(linear)
        else:
            raise TypeError(f"no NumPy counterpart for {type(module).__name__}")
    for layer in layers:
        if isinstance(layer, cpubn.BatchNorm):
            layer.eval()
    return layers


@dataclass
class Row:
    layout: str
    variant: str
    max_logit_diff: float
    same_predictions: float


def compare(steps=30, seed=0, images=256):
    """Train, port every variant in both layouts, and compare eval logits with PyTorch's."""
    torch = _import_torch()
    model = train_torch_model(build_torch_model(seed), steps, seed)
    x, _ = synthetic_images(images, np.random.default_rng(seed + 1))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    rows = []
    for layout in ("nchw", "nhwc"):
        channels_last = layout == "nhwc"
        data = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x
        for variant in VARIANTS:
            logits = nn.forward(port(model, variant, channels_last), data)
            rows.append(Row(layout, variant, float(np.abs(logits - expected).max()),
                            float((logits.argmax(1) == expected.argmax(1)).mean())))
    return model, rows


def format_table(rows):
    lines = [f"{'layout':<7}{'variant':<12}{'max |logit diff|':>18}{'same pred.':>12}"]
    lines += [f"{r.layout:<7}{r.variant:<12}{r.max_logit_diff:>18.2e}{r.same_predictions:>12.1%}"
              for r in rows]
    return "\n".join(lines)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="SGD steps in PyTorch")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        _import_torch()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, rows = compare(args.steps, args.seed)
    bn = model[0][1]
    print(f"PyTorch CNN trained {args.steps} SGD steps (first BatchNorm: running_mean in "
          f"[{bn.running_mean.min():.2f}, {bn.running_mean.max():.2f}], "
          f"num_batches_tracked={int(bn.num_batches_tracked)}), eval outputs on 256 images "
          f"against PyTorch's:\n")
    print(format_table(rows))
    worst = max(row.max_logit_diff for row in rows)
    print(f"\nlargest difference {worst:.1e} (float32; tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
