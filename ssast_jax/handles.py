"""Handles: a model's config, its NNX graph definition and parameter state, and what is
known of where it came from. Every loader returns one of the two kinds, and every export
takes one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ssast_jax.model import ModelConfig, abstract_model
from ssast_jax.model.classifier import ClassifierConfig, abstract_classifier


@dataclasses.dataclass
class Handle:
  """A model: its `config`, the NNX `graphdef` and parameter `state`, `extras` (the unused
  timm head tensors of an imported checkpoint, written back on export) and `info` (what
  its source recorded: `source`, `step`, `workdir`, `labels`, `mean`, `std`, ...)."""
  config: ModelConfig
  graphdef: nnx.GraphDef
  state: nnx.State
  extras: dict = dataclasses.field(default_factory=dict)
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def params(self) -> dict:
    """Parameters as a nested dict of arrays (the layout the interchange reads, writes)."""
    return nnx.to_pure_dict(self.state)

  @property
  def module(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state)


@dataclasses.dataclass
class ModelHandle(Handle):
  """A pretraining model (`module` is an `SSAST`)."""


@dataclasses.dataclass
class ClassifierHandle(Handle):
  """A classifier (`module` is a `Classifier`; `config` a ClassifierConfig, with the
  pooling; a fine-tuning run's `info` has its label names and normalisation)."""
  config: ClassifierConfig


def _filled(abstract_state, params: dict):
  nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, params))
  return abstract_state


def handle_from_params(config: ModelConfig, params: dict, extras=None,
                       info=None) -> ModelHandle:
  """A pretraining-model handle holding `params` (the nested dict of `ModelHandle.params`)."""
  graphdef, state = abstract_model(config)
  return ModelHandle(config, graphdef, _filled(state, params), dict(extras or {}),
                     dict(info or {}))


def classifier_from_params(config: ClassifierConfig, params: dict, extras=None,
                           info=None) -> ClassifierHandle:
  """A classifier handle holding `params` (the nested dict of `ClassifierHandle.params`)."""
  graphdef, state = abstract_classifier(config)
  return ClassifierHandle(config, graphdef, _filled(state, params), dict(extras or {}),
                          dict(info or {}))


def from_params(config: ModelConfig, params: dict, extras=None, info=None):
  """The handle of the kind `config` says (a ClassifierConfig gives a classifier)."""
  if isinstance(config, ClassifierConfig):
    return classifier_from_params(config, params, extras, info)
  return handle_from_params(config, params, extras, info)
