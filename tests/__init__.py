"""The project's tests (a regular package, so that ``tests.conftest`` is never another distribution's ``tests``)."""
