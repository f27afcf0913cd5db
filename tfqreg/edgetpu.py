"""The Edge TPU pre-flight check, under its earlier name: re-exports
:mod:`tfqreg.deploy.edgetpu`."""

from tfqreg.deploy.edgetpu import (CHECKED_LIMITS, SUPPORTED_OPS, EdgeTpuReport, OpCheck,
                                   check_edgetpu)

__all__ = ["SUPPORTED_OPS", "CHECKED_LIMITS", "OpCheck", "EdgeTpuReport", "check_edgetpu"]
