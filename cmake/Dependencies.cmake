# Finds every dependency through find_package / imported targets and records a line for the
# configure-time summary. LibTorch comes from the torch wheel installed by scripts/setup: pass
# -DCMAKE_PREFIX_PATH=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)').

set(_mpitrain_summary "")
function(mpitrain_note name found version where)
  if(found)
    set(_line "  ${name}: found ${version} (${where})")
  else()
    set(_line "  ${name}: NOT FOUND ${where}")
  endif()
  set(_mpitrain_summary "${_mpitrain_summary}${_line}\n" PARENT_SCOPE)
endfunction()

# --- MPI, HDF5, json, Catch2, CLI11: Debian packages ------------------------------------------
find_package(MPI REQUIRED COMPONENTS CXX)
execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _mpi_impl
                ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
string(REGEX REPLACE "\n.*" "" _mpi_impl "${_mpi_impl}")
mpitrain_note("MPI" ON "MPI ${MPI_CXX_VERSION}, ${_mpi_impl}" "${MPIEXEC_EXECUTABLE}")

find_package(HDF5 REQUIRED COMPONENTS C)
mpitrain_note("HDF5" ON "${HDF5_VERSION}" "${HDF5_INCLUDE_DIRS}")
# An imported target so consumers never see HDF5's variables.
if(NOT TARGET hdf5::hdf5)
  add_library(hdf5::hdf5 INTERFACE IMPORTED)
  target_include_directories(hdf5::hdf5 INTERFACE ${HDF5_C_INCLUDE_DIRS})
  target_link_libraries(hdf5::hdf5 INTERFACE ${HDF5_C_LIBRARIES})
  target_compile_definitions(hdf5::hdf5 INTERFACE ${HDF5_C_DEFINITIONS})
endif()

find_package(nlohmann_json 3 REQUIRED)
mpitrain_note("nlohmann_json" ON "${nlohmann_json_VERSION}" "${nlohmann_json_DIR}")

find_package(CLI11 REQUIRED)
mpitrain_note("CLI11" ON "${CLI11_VERSION}" "${CLI11_DIR}")

if(MPITRAIN_BUILD_TESTS)
  find_package(Catch2 2 REQUIRED)
  mpitrain_note("Catch2" ON "${Catch2_VERSION}" "${Catch2_DIR}")
endif()

# --- LibTorch (and through it, CUDA) ------------------------------------------------------------
# A CUDA wheel makes find_package(Torch) enable the CUDA language; give it the architectures of
# the GPUs we target so configure does not probe a GPU that is not there.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 80;90)
endif()
include(mpitrainTorch)
mpitrain_find_torch(${MPITRAIN_WITH_CUDA})
mpitrain_note("LibTorch" ON "${Torch_VERSION}" "${Torch_DIR}")

# The wheel's CUDA run time and NCCL are in the run paths of the programs, in the build tree and
# installed: a GPU node needs the NVIDIA driver, not a CUDA toolkit (docs/building.md).
list(APPEND CMAKE_BUILD_RPATH ${MPITRAIN_TORCH_RPATH})
list(APPEND CMAKE_INSTALL_RPATH ${MPITRAIN_TORCH_RPATH})

set(MPITRAIN_HAVE_CUDA ${MPITRAIN_TORCH_CUDA})
if(MPITRAIN_TORCH_CUDA)
  mpitrain_note("CUDA" ON "${CUDAToolkit_VERSION}" "${CUDAToolkit_BIN_DIR}")
else()
  mpitrain_note("CUDA" OFF "" "(CPU-only build: ${MPITRAIN_TORCH_WHY})")
endif()

# --- NCCL: the copy the torch wheel loads, so one process holds one NCCL -------------------------
if(MPITRAIN_HAVE_CUDA)
  # The wheel's NCCL sits beside torch in site-packages (found by mpitrain_find_torch).
  set(_site "${_mpitrain_site}")
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS "${_site}/nvidia/nccl/include" NO_DEFAULT_PATH)
  find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS "${_site}/nvidia/nccl/lib" NO_DEFAULT_PATH)
  if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_ver REGEX "#define NCCL_(MAJOR|MINOR|PATCH) ")
    string(REGEX REPLACE ".*NCCL_MAJOR ([0-9]+).*NCCL_MINOR ([0-9]+).*NCCL_PATCH ([0-9]+).*"
           "\\1.\\2.\\3" NCCL_VERSION "${_nccl_ver}")
    add_library(mpitrain_nccl SHARED IMPORTED)
    set_target_properties(mpitrain_nccl PROPERTIES
      IMPORTED_LOCATION "${NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
    mpitrain_note("NCCL" ON "${NCCL_VERSION}" "${NCCL_LIBRARY}")
  else()
    message(WARNING "CUDA LibTorch found but not the wheel's NCCL under ${_site}/nvidia/nccl: "
                    "the NCCL backend is disabled. Re-run scripts/setup.")
    set(MPITRAIN_HAVE_CUDA OFF)
    mpitrain_note("NCCL" OFF "" "(looked in ${_site}/nvidia/nccl)")
  endif()
else()
  mpitrain_note("NCCL" OFF "" "(CPU-only build)")
endif()

function(mpitrain_print_summary)
  if(MPITRAIN_HAVE_CUDA)
    set(_mode "CPU (MPI) + GPU (NCCL)")
  else()
    set(_mode "CPU-only: MPI backend only, no NCCL")
  endif()
  message(STATUS "mpitrain ${PROJECT_VERSION} dependency summary:\n${_mpitrain_summary}"
                 "  build: ${_mode}, ${CMAKE_BUILD_TYPE}")
endfunction()
