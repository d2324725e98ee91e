"""DX-LLaVA: the model class (`dxllava`), building one (`build`: tiny preset, composition),
checkpoint folders (`checkpoint`), and `generate`, the one inference engine that eval, detect
and RL rollouts share."""
