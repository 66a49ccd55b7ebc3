def test_package_imports():
    import lowvram_stepvideo.checkpoint  # noqa: F401
    import lowvram_stepvideo.config  # noqa: F401
