# Warnings are a property of our targets, never global flags.
add_library(mpitrain_warnings INTERFACE)
add_library(mpitrain::warnings ALIAS mpitrain_warnings)
target_compile_options(mpitrain_warnings INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wno-unused-parameter>)
