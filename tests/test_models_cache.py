"""Where the converted bundled model is cached: the platform's cache folder, keyed on versions."""

from __future__ import annotations

import sys

import transformers

import atman_kernels
from atman_kernels.models import cache_root, default_cache_dir


def test_cache_follows_atman_cache_then_the_platform(monkeypatch, tmp_path):
    monkeypatch.setenv("ATMAN_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("ATMAN_CACHE")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_root() == tmp_path / "xdg" / "atman_kernels"
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert cache_root() == tmp_path / "home" / ".cache" / "atman_kernels"


def test_converted_model_folder_is_keyed_on_package_and_transformers_versions(monkeypatch,
                                                                              tmp_path):
    monkeypatch.setenv("ATMAN_CACHE", str(tmp_path))
    name = default_cache_dir().name
    assert atman_kernels.__version__ in name and transformers.__version__ in name
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    assert default_cache_dir().name != name  # another transformers: another conversion
