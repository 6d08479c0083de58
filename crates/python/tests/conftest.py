"""The architecture tests' summary: per model type of the installed transformers, what
weightlift did with it, or why it could not be built tiny (never skipped silently)."""


def pytest_terminal_summary(terminalreporter):
    import sys

    module = sys.modules.get("test_architectures")
    report = getattr(module, "REPORT", None)
    if not report:
        return
    import transformers

    terminalreporter.section(f"architectures on transformers {transformers.__version__}")
    for name in sorted(report):
        terminalreporter.write_line(f"{name:24} {report[name]}")
