"""The one exception hierarchy of xllm_compiler: what went wrong, named by file, tensor or option.

The CLI maps these to exit codes: an ``InputError`` (the user can fix it) exits 2 with one line on stderr;
any other ``XllmError`` is our fault and exits 1. ``InputError`` is also a ``ValueError`` so that Python
callers can catch bad input the ordinary way.
"""

from __future__ import annotations


class XllmError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(XllmError, ValueError):
    """Bad input that the user can fix: options, paths, requests."""


class OptionsError(InputError):
    """A compile or load option has a value we cannot use."""


class ConfigError(InputError):
    """config.json is missing, unreadable, or describes a model we do not support."""


class CheckpointError(InputError):
    """A weights file is missing, truncated, or holds a tensor of the wrong name or shape."""


class OutputDirError(InputError):
    """The output folder exists and is not empty, and --force was not given."""


class ArtifactError(InputError):
    """A compiled artifact is missing, tampered with, truncated or from an incompatible version."""


class DeviceError(InputError):
    """The requested device (cuda, npu) is not available in this process."""


class RequestError(InputError):
    """A logits()/generate() request the model cannot serve: empty prompt, id out of range, too long."""


class KVCacheExhaustedError(InputError):
    """A request needs more KV-cache blocks than the pool can ever give it."""


class CompileError(XllmError):
    """A compile stage failed on input it accepted: a bug, or a pass that changed results."""
