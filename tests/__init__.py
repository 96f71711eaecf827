"""The tests, a package with one sub-package per folder (``tests.tune.test_sweep``): pytest then puts the repository
root on ``sys.path``, not each test's folder, so ``tests/dilm`` and ``tests/tune`` cannot shadow the ``dilm`` and
``tune`` packages, and the shared helpers import as ``tests.userdata``, ``tests.browser``, ``tests.conftest``."""
