"""``artifactscan.fix``: the training-free repair, re-exported from :mod:`artifactscan.analysis.fix`."""

from artifactscan.analysis.fix import FixReport, find_register_neurons, fix
from artifactscan.models.test_time_register import RegisterNeuron, TestTimeRegister, apply_test_time_register

__all__ = ["FixReport", "RegisterNeuron", "TestTimeRegister", "apply_test_time_register", "find_register_neurons",
           "fix"]
