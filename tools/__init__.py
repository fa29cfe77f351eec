"""Tools beside the reading path: conversion, the latent cache, evaluation, benchmarks, the toy world and
the tiny models the tests share. Run from the repository root as modules: python -m tools.convert ..."""
