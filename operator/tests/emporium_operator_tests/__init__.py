"""The operator's tests. A package, so pytest's importlib mode never imports the top-level `operator/`
folder as a module (that would shadow the standard library's `operator` for the whole session)."""
