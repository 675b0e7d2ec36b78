"""Efficient controllable multi-task architectures (Aich et al., ICCV 2023):
a width-slimmable shared encoder with per-task slimmable decoders
(`slimmable`), trained once with configuration-invariant distillation
(`distill`), the preference + budget -> widths search (`search`) and the
`controllable` job (`bench`)."""
