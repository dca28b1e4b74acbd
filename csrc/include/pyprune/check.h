// Argument checks with user-facing messages: each names the op, the argument and what was expected.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once
#include <torch/extension.h>

#define PYPRUNE_CHECK(cond, op, arg, ...) \
  TORCH_CHECK_VALUE(cond, "pyprune::", op, ": argument '", arg, "' ", __VA_ARGS__)

#define PYPRUNE_CHECK_DTYPE(t, op, arg, dt)                                                       \
  TORCH_CHECK_TYPE((t).scalar_type() == (dt), "pyprune::", op, ": argument '", arg, "' must be ", \
                   c10::toString(dt), ", got ", (t).scalar_type())

#define PYPRUNE_CHECK_CPU(t, op, arg) \
  PYPRUNE_CHECK((t).device().is_cpu(), op, arg, "must be on the CPU, got ", (t).device())

#define PYPRUNE_CHECK_DIM(t, d, op, arg) \
  PYPRUNE_CHECK((t).dim() == (d), op, arg, "must be ", d, "-D, got shape ", (t).sizes())
