"""PyTorch meta-steps for the real_models benchmark: what a PyTorch user writes today.

The models of `experiments.models` (Conv-4 without batch norm, ResNet-12) as `torch.nn`
modules, and MAML written with `torch.func.functional_call` and `torch.autograd.grad`
(``create_graph=True`` for second order), one task at a time with the query loss
back-propagated per task, as in learn2learn's examples. FOMAML takes the inner gradients
without a graph; gradient sharing (the rule of SPEC section 1, m_k and λ_k learned) steps the
tasks in lock-step and back-propagates once; Reptile adapts each task on its support images
under plain autograd, evaluates the query loss at the adapted weights (without a graph, the
loss `metagrad.reptile` reports) and hands φ − mean_t θ_t to the optimizer as the gradient.

Weights come from the JAX params (HWIO kernels to OIHW, dense ``[in, out]`` to ``[out, in]``)
so both frameworks start from the same point; images are converted NHWC -> NCHW once, outside
the timed loop, and features are flattened in NHWC order so the dense head sees the same
layout. Needs ``pip install "metagrad[bench]"`` (torch).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from experiments.models import torch_layout

OUTERS = ("adam", "sgd1")


class Conv4(nn.Module):
    """4 × [conv 3×3, ReLU, max-pool 2], dense head; `experiments.models.conv4_apply`."""

    def __init__(self, in_channels, hidden, features, ways):
        super().__init__()
        chans = [in_channels] + [hidden] * 4
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = nn.Linear(features, ways)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
            if x.shape[2] >= 2:
                x = F.max_pool2d(x, 2)
        return self.head(x.permute(0, 2, 3, 1).flatten(1))


class _Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, cout, 3, padding=1) for a in (cin, cout, cout))
        self.short = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y)
            if i < 2:
                y = F.leaky_relu(y, 0.1)
        x = F.leaky_relu(y + self.short(x), 0.1)
        return F.max_pool2d(x, 2) if x.shape[2] >= 2 else x


class ResNet12(nn.Module):
    """`experiments.models.resnet12_apply` (no batch norm, global average pooling)."""

    def __init__(self, channels, ways):
        super().__init__()
        chans = list(channels)
        self.stages = nn.ModuleList(
            _Stage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = nn.Linear(chans[-1], ways)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


def build(model: str, params):
    """The torch module for `model` ("conv4" or "resnet12") holding a copy of `params`."""
    if model == "conv4":
        w = params[0]["w"]
        head = params[-1]["w"]
        module = Conv4(w.shape[2], w.shape[3], head.shape[0], head.shape[1])
    else:
        chans = [params[0]["convs"][0]["w"].shape[2]]
        chans += [stage["convs"][0]["w"].shape[3] for stage in params[:-1]]
        module = ResNet12(chans, params[-1]["w"].shape[1])
    layout = torch_layout(params, model)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in layout.items()})
    return module


def to_torch_batch(images, labels):
    """``[T, N, H, W, C]`` images and ``[T, N]`` labels as torch tensors (images NCHW)."""
    x = torch.from_numpy(np.array(images, np.float32)).permute(0, 1, 4, 2, 3).contiguous()
    return x, torch.from_numpy(np.array(labels, np.int64))


class TorchMeta:
    """A meta-learner in PyTorch: ``step(tasks)`` performs one outer step in place."""

    def __init__(self, method, model, params, num_steps, lr, outer="adam", outer_lr=1e-3):
        if outer not in OUTERS:
            raise ValueError(f"outer must be one of {OUTERS}, got {outer!r}")
        self.method, self.model_name, self.num_steps, self.lr = method, model, num_steps, lr
        self.module = build(model, params)
        self.params = dict(self.module.named_parameters())
        learned = []
        if method == "grad_share":
            self.logits = [torch.zeros(num_steps, requires_grad=True) for _ in range(2)]
            self.average = {n: torch.zeros_like(p) for n, p in self.params.items()}
            learned = self.logits
        weights = list(self.params.values()) + learned
        if outer == "adam":
            self.opt = torch.optim.Adam(weights, lr=outer_lr)
        else:  # plain MG subtraction, for the correctness check
            self.opt = torch.optim.SGD(weights, lr=1.0)

    def _loss(self, p, x, y):
        return F.cross_entropy(functional_call(self.module, p, (x,)), y)

    def _adapt(self, fast, x, y, create_graph):
        loss = self._loss(fast, x, y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
        return {n: w - self.lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}

    def step(self, tasks):
        """One outer step; `tasks` is ``((x_s, y_s), (x_q, y_q))``."""
        self.opt.zero_grad(set_to_none=True)
        (xs, ys), (xq, yq) = tasks
        if self.method == "reptile":
            self._reptile(xs, ys, xq, yq)
        elif self.method in ("maml", "fomaml"):
            second = self.method == "maml"
            for t in range(xs.shape[0]):
                fast = self.params
                for _ in range(self.num_steps):
                    fast = self._adapt(fast, xs[t], ys[t], second)
                (self._loss(fast, xq[t], yq[t]) / xs.shape[0]).backward()
        elif self.method == "grad_share":
            self._grad_share(xs, ys, xq, yq)
        self.opt.step()

    def _grad_share(self, xs, ys, xq, yq):
        num_tasks = xs.shape[0]
        rates, gates = (torch.sigmoid(x) for x in self.logits)
        average = self.average
        fast = [self.params] * num_tasks
        for k in range(self.num_steps):
            grads = []
            for t in range(num_tasks):
                loss = self._loss(fast[t], xs[t], ys[t])
                grads.append(torch.autograd.grad(loss, list(fast[t].values()), create_graph=True))
            inv = [torch.rsqrt(sum((g * g).sum() for g in gs)) for gs in grads]
            average = {
                n: (1 - rates[k]) * average[n]
                + rates[k] * sum(i * gs[j] for i, gs in zip(inv, grads, strict=True)) / num_tasks
                for j, n in enumerate(self.params)
            }
            fast = [
                {
                    n: w - self.lr * ((1 - gates[k]) * g + gates[k] * average[n])
                    for (n, w), g in zip(f.items(), gs, strict=True)
                }
                for f, gs in zip(fast, grads, strict=True)
            ]
        loss = sum(self._loss(f, xq[t], yq[t]) for t, f in enumerate(fast)) / num_tasks
        loss.backward()
        self.average = {n: a.detach() for n, a in average.items()}

    def _reptile(self, xs, ys, xq, yq):
        num_tasks = xs.shape[0]
        mean = {n: torch.zeros_like(p) for n, p in self.params.items()}
        query_loss = torch.zeros(())
        for t in range(num_tasks):
            fast = {n: p.detach().requires_grad_() for n, p in self.params.items()}
            for _ in range(self.num_steps):
                fast = {
                    n: w.detach().requires_grad_()
                    for n, w in self._adapt(fast, xs[t], ys[t], False).items()
                }
            with torch.no_grad():
                query_loss += self._loss(fast, xq[t], yq[t]) / num_tasks
            for n, w in fast.items():
                mean[n] += w.detach() / num_tasks
        for n, p in self.params.items():
            p.grad = p.detach() - mean[n]
        self.query_loss = query_loss  # the loss metagrad.reptile reports

    def torch_layout_params(self):
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}
