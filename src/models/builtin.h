#pragma once
// The built-in models' specs. The registry adds them when it is created, so they are present
// even when the linker keeps only the object files that something references.

#include "mpitrain/models/registry.h"

namespace mpitrain::models::builtin {

ModelSpec mlp();
ModelSpec cnn();
ModelSpec gpt();

}  // namespace mpitrain::models::builtin
