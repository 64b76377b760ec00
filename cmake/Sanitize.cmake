# MPITRAIN_SANITIZE (CMakeLists.txt): build mpitrain's own code with sanitizers, e.g.
# -DMPITRAIN_SANITIZE=address,undefined. Like the warnings, the flags are a property of our
# targets, never global flags: they ride on the INTERFACE target mpitrain::sanitize, which
# mpitrain::warnings links, and every target of ours (library, programs, tests, benchmarks)
# links mpitrain::warnings. LibTorch, MPI and HDF5 stay uninstrumented, which ASan and UBSan
# allow. UBSan findings are not recoverable: the first one ends the process (exit 1), so a test
# cannot pass over one. docs/reliability.md ("Sanitizers") says how to run such a build.
add_library(mpitrain_sanitize INTERFACE)
add_library(mpitrain::sanitize ALIAS mpitrain_sanitize)
target_link_libraries(mpitrain_warnings INTERFACE mpitrain_sanitize)

# The run-time options such a build needs are MPITRAIN_SANITIZE_ENV (CMakeLists.txt), which the
# tests' environment carries (tests/CMakeLists.txt):
#   ASAN_OPTIONS=detect_leaks=0   Open MPI and LibTorch leave allocations behind at exit.
#   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1   where, not only what; and stop there.
if(MPITRAIN_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "MPITRAIN_SANITIZE needs GCC or Clang, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  string(REPLACE ";" "," _sanitizers "${MPITRAIN_SANITIZE}")
  target_compile_options(mpitrain_sanitize INTERFACE
    -fsanitize=${_sanitizers} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_link_options(mpitrain_sanitize INTERFACE -fsanitize=${_sanitizers})
  message(STATUS "mpitrain: sanitizers ${_sanitizers}; the tests run with ${MPITRAIN_SANITIZE_ENV}")
endif()
