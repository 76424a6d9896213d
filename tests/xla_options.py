"""XLA compile options for the suite's few run-bound programs.

``tests/conftest.py`` compiles every program at LLVM's optimization level 0, which halves the
compile time of the many small programs that dominate the suite but leaves loops
unvectorized. A program run for many steps (a short training run) is bound by running, not by
compiling, so it is compiled with XLA's default level instead, per program:
``jax.jit(f, compiler_options=RUN_BOUND)``.
"""

RUN_BOUND = {"xla_backend_optimization_level": 3}
