import copy
import logging

import pytest
import torch

from hetrun.tiny_models import FAMILY_SPECS, tiny_model

FAMILIES = list(FAMILY_SPECS)


@pytest.fixture(scope="session")
def family_models():
    """One tiny model per family, built once; tests deep-copy before deploying."""
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.fixture
def fresh(family_models):
    return lambda family: copy.deepcopy(family_models[family])


@pytest.fixture(autouse=True)
def _quiet_hetrun_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="hetrun")
    torch.set_num_threads(1)  # two xdist workers share two cores; tiny ops only get slower with more threads
    yield
