"""Stand-in for numba on the GPU machine, which has no numba (and no network to install it).

Only `numba.njit` is used by sim/ (sim.cache.fast, sim.cache.hobbit, sim.synth); with this stub the
decorated functions run as plain Python. `jaxmoe.scale` sees JAXMOE_STUB and takes sim's pure-Python
replay path (the reference the compiled path is tested against). Put this folder LAST on PYTHONPATH
so that a real numba, where installed, wins.
"""
JAXMOE_STUB = True


def njit(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda f: f


jit = njit
