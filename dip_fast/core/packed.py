"""Packed networks: K independent generators held as one module and trained in one step.

One 256x256 restoration leaves most of a large GPU idle: the paper's network
at batch size one is hundreds of small kernels.  Packing ``K`` networks of
one architecture side by side turns each of those kernels into one ``K``
times larger:

* every convolution becomes one convolution grouped ``K`` ways (``K x`` the
  channels; group ``k`` holds network ``k``'s filters, so no filter sees
  another network's channels);
* BatchNorm normalises per channel, so per network, exactly;
* the joins of the hourglass concatenate per group (``upsample_cat(...,
  groups=K)``), and the output ``(1, K * C, H, W)`` holds network ``k``'s
  image in channels ``[k C, (k + 1) C)``.

Network ``k`` of a packed module computes exactly what network ``k`` alone
computes (up to the rounding of a grouped against a plain convolution), and
since the loss of a packed run is the *sum* of the per-network data terms,
each network's gradient is its own: a packed run is ``K`` separate runs
(``tests/test_packed.py`` checks this in float64).  Batch size ``N > 1``
could not do this: BatchNorm would mix the networks' statistics.

Weights are packed by concatenating every parameter and buffer of the ``K``
networks along its first dimension, which is the layout of a grouped
convolution's weight: so a packed module starts from the ``K`` networks'
own initialisations.

Examples:
    >>> import torch
    >>> from dip_fast.reference import skip
    >>> from dip_fast.core.packed import pack, unpack
    >>> nets = [skip(2, 3, [4, 4], [4, 4], [2, 2]) for _ in range(3)]
    >>> packed = pack(nets)
    >>> z = torch.rand(3, 2, 16, 16)  # one input per network
    >>> out = packed(z.reshape(1, 6, 16, 16)).reshape(3, 3, 16, 16)
    >>> torch.allclose(out[1], nets[1](z[1:2])[0], atol=1e-6)
    True
    >>> [n.out.weight.shape for n in unpack(packed)][0]
    torch.Size([3, 4, 1, 1])
    >>> two = select_networks(packed, [0, 2])  # networks 0 and 2 of the three, packed
    >>> out2 = two(z[[0, 2]].reshape(1, 4, 16, 16)).reshape(2, 3, 16, 16)
    >>> torch.allclose(out2[1], out[2], atol=1e-6)
    True
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from ..reference.skip import SkipNet
from .networks import to_channels_last

__all__ = ["pack", "pack_state_dicts", "packable", "select_networks", "unpack", "unpack_state_dict", "write_networks"]


def packable(net: nn.Module) -> bool:
    """Whether ``net`` is a single (unpacked) network of an architecture that packs (the skip hourglass)."""
    return isinstance(net, SkipNet) and net.networks == 1


def pack_state_dicts(states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The state dict of the packed module of networks with these state dicts (same keys and shapes).

    Every tensor is concatenated along its first dimension; 0-d buffers
    (BatchNorm's batch counters) are the same for networks trained in step,
    and the first network's is kept.
    """
    if not states:
        raise ValueError("pack needs at least one network")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"network {i} does not have the architecture of network 0; only equal networks pack")
    return {
        k: states[0][k].clone() if states[0][k].dim() == 0 else torch.cat([s[k] for s in states], dim=0)
        for k in keys
    }


def unpack_state_dict(state: Dict[str, torch.Tensor], networks: int) -> List[Dict[str, torch.Tensor]]:
    """The inverse of :func:`pack_state_dicts`: ``networks`` state dicts."""
    out: List[Dict[str, torch.Tensor]] = [{} for _ in range(networks)]
    for k, t in state.items():
        parts = [t] * networks if t.dim() == 0 else torch.chunk(t, networks, dim=0)
        for i, part in enumerate(parts):
            out[i][k] = part.clone()
    return out


def pack(nets: Sequence[nn.Module]) -> SkipNet:
    """One module computing the ``K`` networks ``nets`` at once, starting from their weights.

    The networks must be skip networks (reference or fast) of one
    configuration; the packed module is of their class, on their device,
    in training mode like them.  Its input is the ``K`` inputs concatenated
    along channels, and so is its output.
    """
    nets = list(nets)
    if not nets:
        raise ValueError("pack needs at least one network")
    for i, net in enumerate(nets):
        if not packable(net):
            raise ValueError(f"network {i} ({type(net).__name__}) is not a single skip network; it cannot be packed")
        if net.config != nets[0].config or type(net) is not type(nets[0]):
            raise ValueError(f"network {i} does not have the architecture of network 0; only equal networks pack")
    return _module_like(nets[0], len(nets), pack_state_dicts([n.state_dict() for n in nets]))


def unpack(packed: SkipNet) -> List[SkipNet]:
    """The ``K`` networks of a packed module, as separate modules of its class (copies of the weights)."""
    return [_module_like(packed, 1, state) for state in unpack_state_dict(packed.state_dict(), packed.networks)]


def _module_like(net: SkipNet, networks: int, state: Dict[str, torch.Tensor]) -> SkipNet:
    """A module of ``net``'s class, configuration, layout, device, dtype and mode, of ``networks``
    networks, holding ``state``."""
    ref = next(net.parameters())
    out = type(net)(net.config, networks=networks).to(device=ref.device, dtype=ref.dtype)
    if getattr(net, "channels_last", False):
        to_channels_last(out)
    out.load_state_dict(state)
    out.train(net.training)
    return out


def select_networks(packed: SkipNet, keep: Sequence[int]) -> SkipNet:
    """A packed module of networks ``keep`` of ``packed`` only, in that order (copies of their weights).

    A packed run drops the networks that have stopped this way
    (:meth:`dip_fast.core.step.StepRunner.select`): a grouped convolution computes
    every group, so a stopped network left in the pack costs a running one's
    compute.
    """
    keep = list(keep)
    if not keep or any(not 0 <= i < packed.networks for i in keep):
        raise ValueError(f"keep must name some of the {packed.networks} networks, got {keep}")
    states = unpack_state_dict(packed.state_dict(), packed.networks)
    return _module_like(packed, len(keep), pack_state_dicts([states[i] for i in keep]))


@torch.no_grad()
def write_networks(packed: SkipNet, part: SkipNet, rows: Sequence[int]) -> None:
    """Copy the weights and buffers of ``part``'s networks into networks ``rows`` of ``packed``.

    The inverse of :func:`select_networks`: a packed fit that dropped some
    networks writes the others' progress back into the module it was given.

    >>> import torch
    >>> from dip_fast.reference import skip
    >>> packed = pack([skip(2, 3, [4], [4], [2]) for _ in range(3)])
    >>> part = select_networks(packed, [2])
    >>> _ = part.out.weight.data.fill_(7.0)
    >>> write_networks(packed, part, [2])
    >>> [float(w.mean()) for w in packed.out.weight.chunk(3)][2]
    7.0
    """
    ours, theirs = packed.state_dict(), part.state_dict()  # tensors sharing the modules' storage
    for key, t in ours.items():
        if t.dim() == 0:
            continue  # batch counters: the same for networks trained in step
        mine, given = torch.chunk(t, packed.networks, dim=0), torch.chunk(theirs[key], part.networks, dim=0)
        for row, value in zip(rows, given):
            mine[row].copy_(value)
