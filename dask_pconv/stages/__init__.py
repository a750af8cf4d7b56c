"""Running a model as stages: the block interpreter (:mod:`~dask_pconv.stages.block`), the
planner (:mod:`~dask_pconv.stages.plan`) and the lowering to Dask tasks
(:mod:`~dask_pconv.stages.lower`)."""
