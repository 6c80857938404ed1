"""Shared fixtures: the test bed of testing/ (fake Resource Manager, Data Plane emulator)."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "testing"))


@pytest.fixture
def arm(monkeypatch):
    """A running fake of Azure Resource Manager (empty estate), and an environment in
    which the real DefaultAzureCredential gets its token from it."""
    from fake_arm import FakeArm
    for key in list(os.environ):
        if key.startswith(("AZURE_", "IDENTITY_", "MSI_")):
            monkeypatch.delenv(key)
    with FakeArm(page_size=100) as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        yield fake
