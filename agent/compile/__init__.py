"""Pure compilers: Policy -> artifacts the enforcers hand to the kernel.

No root and no state-changing system calls here; the same policy always
compiles to the same bytes. Submodules import libseccomp lazily, so that
loading a manifest stays cheap.
"""

# Lazy: importing a single compiler (or agent.compile.env from the launcher)
# must not import the manifest model (bench/launch).


def __getattr__(name: str):
    if name in ("Artifacts", "compile_policy"):
        from agent.compile import artifacts

        return getattr(artifacts, name)
    raise AttributeError(f"module 'agent.compile' has no attribute {name!r}")
