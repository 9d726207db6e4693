"""Reports without matplotlib: the plots are skipped with one notice, never silently or with a crash."""
import sys

from forerun import plotting


def test_without_matplotlib_plots_are_skipped_with_one_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    plotting.pyplot.cache_clear()
    try:
        assert plotting.pyplot() is None
        assert plotting.pyplot() is None
    finally:
        plotting.pyplot.cache_clear()
    assert capsys.readouterr().err.count("no plots are written") == 1


def test_with_matplotlib_plots_use_the_file_backend():
    plotting.pyplot.cache_clear()
    plt = plotting.pyplot()
    assert plt is not None and plt.get_backend().lower() == "agg"
