"""The daemon's hot modules, built as C extensions by Cython (README "Compiled modules").

Everything else about the package is in pyproject.toml. The modules below are the ones an
order passes through at every stage: the runtime's hop, the stages' logic, intake, the
stores' client side, the simulated downstream systems. Compiled unchanged from their Python
source (no type declarations), they cost the production benchmark's daemons ~10% less CPU
an order (bench/RESULTS.md). The source stays the truth: `oms_pipeline/compiled.py` imports a
module from its .py wherever the extension is older than the source (an edit not yet
rebuilt), and `make build` rebuilds.

Every extension is optional: without a C compiler, or with OMS_PURE_PYTHON=1, the package
installs and runs as plain Python, only slower.
"""
from __future__ import annotations

import os

from setuptools import Extension, setup

COMPILED = (
    "oms_pipeline/bqueue.py", "oms_pipeline/clock.py", "oms_pipeline/cpu_pool.py",
    "oms_pipeline/flags.py", "oms_pipeline/generator.py", "oms_pipeline/intake.py",
    "oms_pipeline/metrics.py", "oms_pipeline/order_no.py", "oms_pipeline/order.py",
    "oms_pipeline/outcome.py", "oms_pipeline/pipeline.py", "oms_pipeline/relay.py",
    "oms_pipeline/routing.py", "oms_pipeline/stage.py", "oms_pipeline/states.py",
    "oms_pipeline/stock.py", "oms_pipeline/worker.py", "oms_pipeline/ports/store.py",
    "oms_pipeline/adapters/local_coordination.py", "oms_pipeline/adapters/memory_store.py",
    "oms_pipeline/adapters/postgres_store.py", "oms_pipeline/adapters/redis_coordination.py",
    "oms_pipeline/adapters/rabbitmq_publisher.py", "oms_pipeline/adapters/sqlite_store.py",
    "oms_pipeline/adapters/simulated/effects.py", "oms_pipeline/adapters/simulated/reservations.py",
    "oms_pipeline/adapters/simulated/systems.py", "stages/allocate.py", "stages/audit.py",
    "stages/dispatch_wms.py", "stages/effective_time.py", "stages/erp_stock.py", "stages/fill.py",
    "stages/flow_limit.py", "stages/gifts.py", "stages/invoice.py", "stages/notify_paid.py",
    "stages/presale.py", "stages/reissue_sms.py", "stages/risk_check.py", "stages/split.py",
    "stages/voucher.py", "stages/waybill.py",
)

DIRECTIVES = {
    "language_level": 3,
    # The annotations stay what they are in Python, hints: with typing from them a default that
    # does not match its hint (`children: list = ()`) would be a TypeError.
    "annotation_typing": False,
    "binding": True,  # functions keep __module__, __qualname__, introspection and pickling by name
}

# -O1: the generated C is large (a few MB a module); -O2 built twice as slowly and ran no faster
# (bench/RESULTS.md): the code is calls into the interpreter either way.
COMPILE_ARGS = ["-O1", "-Wno-unused-function"] if os.name == "posix" else []


def extensions() -> list:
    if os.environ.get("OMS_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("oms-pipeline: Cython is not installed; the package is plain Python")
        return []
    modules = [Extension(path[:-3].replace("/", "."), [path], optional=True, extra_compile_args=COMPILE_ARGS)
               for path in COMPILED]
    return cythonize(modules, compiler_directives=DIRECTIVES, nthreads=os.cpu_count() or 1, quiet=True)


setup(ext_modules=extensions(), options={"build_ext": {"parallel": os.cpu_count() or 1}})
