"""A model as a program: named layer nodes, each reading the outputs of earlier nodes, run by
one interpreter for training, evaluation and feature extraction.

A :class:`Node` names a :class:`~dask_pconv.models.layers.Layer` and the nodes it reads
(``inputs``; the program's input is ``"input"``).  A :class:`Program` is a tuple of nodes in
an order where every node comes after its inputs (a directed acyclic graph: a chain for
VGG16, a residual addition or a concatenation reads two nodes).  Parameter and state names are
``"<node name>.<local name>"`` (``block1_1.conv.W``), in program order, unless a node names
them itself (``Node.names``: a model converted from PyTorch keeps PyTorch's names,
``features.0.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .layers import Layer, RunMode

__all__ = ["INPUT", "Node", "Program", "sequential"]

#: The name a node uses to read the program's input.
INPUT = "input"


@dataclass(frozen=True)
class Node:
    """One step of a program: ``layer`` applied to the outputs of the nodes named ``inputs``.

    ``names`` (a mapping, or ``(local, full)`` pairs) gives some of the layer's parameters and
    state arrays full names of their own (``{"W": "features.0.weight"}``); the others are
    ``"<name>.<local>"``.  It is kept as sorted pairs, so that a node stays hashable.
    """

    name: str
    layer: Layer
    inputs: tuple = ()
    names: tuple = ()

    def __post_init__(self):
        pairs = self.names.items() if isinstance(self.names, Mapping) else self.names
        object.__setattr__(self, "names", tuple(sorted((str(k), str(v)) for k, v in pairs)))

    def full_name(self, local):
        """The program-wide name of the layer's parameter or state array ``local``."""
        for k, full in self.names:
            if k == local:
                return full
        return f"{self.name}.{local}"


def sequential(*pairs):
    """A chain of nodes from ``(name, layer)`` pairs: each node reads the one before it (the
    first reads the program's input)."""
    nodes, previous = [], INPUT
    for name, layer in pairs:
        nodes.append(Node(name, layer, (previous,)))
        previous = name
    return Program(tuple(nodes))


@dataclass(frozen=True)
class Program:
    """Layer nodes in dependency order; the last node's output is the program's output.

    Raises ``ValueError`` for a name used twice, an input that names no earlier node, a
    parameter or state name that two arrays would share, or a ``Node.names`` entry for an array
    the layer does not have.
    """

    nodes: tuple

    def __post_init__(self):
        seen = {INPUT}
        for node in self.nodes:
            if not isinstance(node, Node) or not isinstance(node.layer, Layer):
                raise TypeError(f"a program holds Nodes of Layers, got {node!r}")
            if node.name in seen:
                raise ValueError(f"node name {node.name!r} is used twice (or is the reserved {INPUT!r})")
            missing = [i for i in node.inputs if i not in seen]
            if missing or not node.inputs:
                raise ValueError(f"node {node.name!r} reads {missing or 'nothing'}: not an earlier node")
            seen.add(node.name)
            arrays = {**node.layer.params(), **node.layer.state()}
            unknown = sorted(k for k, _ in node.names if k not in arrays)
            if unknown:
                raise ValueError(f"node {node.name!r} names {unknown}; its layer has {sorted(arrays)}")
        if not self.nodes:
            raise ValueError("a program needs at least one node")
        owner = {}
        for node in self.nodes:
            for local in (*node.layer.params(), *node.layer.state()):
                full = node.full_name(local)
                if full in owner:
                    raise ValueError(f"nodes {owner[full]!r} and {node.name!r} both name an array {full!r}")
                owner[full] = node.name

    def __dask_tokenize__(self):
        """The program's Dask token, computed once (a step's graph name hashes the program on
        every build; its nodes never change)."""
        token = self.__dict__.get("_token")
        if token is None:
            from dask.base import tokenize

            token = tokenize(type(self).__name__, self.nodes)
            object.__setattr__(self, "_token", token)
        return token

    def node(self, name):
        """The node called ``name`` (``KeyError`` naming the known ones otherwise)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}; the nodes are {[n.name for n in self.nodes]}")

    def param_specs(self):
        """Every trainable parameter, full name -> :class:`~dask_pconv.models.layers.ArraySpec`,
        in program order."""
        return {n.full_name(k): spec for n in self.nodes for k, spec in n.layer.params().items()}

    def state_specs(self):
        """Every state array (running statistics), full name -> ``ArraySpec``."""
        return {n.full_name(k): spec for n in self.nodes for k, spec in n.layer.state().items()}

    def init(self, seed, dtype):
        """Initial ``(params, state)``, NumPy arrays of ``dtype``; random initializers draw from
        one generator seeded with ``seed``, in program order."""
        rng = np.random.default_rng(seed)
        params = {k: spec.initial(rng, dtype) for k, spec in self.param_specs().items()}
        state = {k: spec.initial(rng, dtype) for k, spec in self.state_specs().items()}
        return params, state

    def run(self, x, params, state, mode=None, until=None, outputs=None):
        """Interpret the program on ``x``: ``(output, new_state)``.

        Parameters
        ----------
        x : dask.array.Array or autodiff.Tensor
            The input.
        params, state : dict
            Full name -> value (tape tensors to record a backward pass, Dask arrays otherwise).
        mode : RunMode, optional
            Training (batch statistics, dropout) or evaluation; default ``RunMode()``
            (training, dropout on, seed 0, step 0).
        until : str, optional
            Stop after this node and return its output (feature extraction).
        outputs : dict, optional
            Filled with every node's output, by node name (the input as ``"input"``): what a
            pass that needs the intermediate shapes reads.

        Returns
        -------
        output
            The last node's output (or ``until``'s), a tensor or a Dask array like the inputs.
        new_state : dict
            Full name -> the state after a training step, for the layers that update any
            (empty in evaluation mode).
        """
        mode = RunMode() if mode is None else mode
        if until is not None:
            self.node(until)  # KeyError naming the nodes
        values, new_state = {INPUT: x} if outputs is None else outputs, {}
        values[INPUT] = x
        for index, node in enumerate(self.nodes):
            local_p = _local(params, node, node.layer.params())
            local_s = _local(state, node, node.layer.state())
            inputs = tuple(values[i] for i in node.inputs)
            out, updated = node.layer.apply(inputs, local_p, local_s, mode, index)
            new_state.update({node.full_name(k): v for k, v in updated.items()})
            values[node.name] = out
            if node.name == until:
                return out, new_state
        return out, new_state


def _local(arrays, node, specs):
    return {k: arrays[node.full_name(k)] for k in specs}
