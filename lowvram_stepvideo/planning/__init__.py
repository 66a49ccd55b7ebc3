"""The memory plan and the fit verdict: the real pipeline traced on data-free tensors (plan,
planned_models), the byte counter behind it (byte_count), the budgets of a machine, the fit of a profile to them and
its report (budgets, fit, verdict), where the decode blends its VAE tiles (decode_blend), planning a bf16 folder as
its quantized version (assumed_format), the plan cache on disk, and the time estimate: each phase's operations
(work), seconds on the target card (estimate) and the card's measured efficiencies (calibration).

May import pipeline, engines, loading, models, files and the root modules.
"""
