def test_package_imports():
    import lowvram_stepvideo.files.weights  # noqa: F401
    import lowvram_stepvideo.files.configs  # noqa: F401
