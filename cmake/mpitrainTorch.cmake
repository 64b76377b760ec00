# mpitrain_find_torch(<want_cuda>): find LibTorch from the torch wheel, with its CUDA part only
# when CUDA is wanted and a CUDA toolkit is there. Used by mpitrain's own build
# (cmake/Dependencies.cmake) and by the installed package's mpitrainConfig.cmake, so both find
# torch the same way.
#
# Why: a CUDA wheel's Caffe2Config.cmake requires a CUDA toolkit (nvcc and headers) even for a
# program that never touches a GPU, so on a machine without one configure failed with "Your
# installed Caffe2 version uses CUDA but I cannot find the CUDA libraries". Without a toolkit
# (or with CUDA not wanted) an empty torch::cudart target is defined first: Caffe2's
# public/cuda.cmake takes its existence as "CUDA already set up" and returns, so no toolkit is
# searched. The targets still link libtorch_cuda.so, whose own run path reaches the CUDA
# libraries inside the wheel (site-packages/nvidia/...), so the programs run as before.
#
# Sets:
#   MPITRAIN_TORCH_CUDA    ON when torch's CUDA part and a CUDA toolkit were found
#   MPITRAIN_TORCH_WHY     why not, when MPITRAIN_TORCH_CUDA is OFF
#   MPITRAIN_TORCH_RPATH   the wheel's library folders the programs load from: torch/lib and the
#                          nvidia/*/lib folders holding the CUDA run time and NCCL. They go into
#                          the build and install run paths, so that a GPU node without a CUDA
#                          toolkit finds libcudart there (the toolkit's folder is not needed).
macro(mpitrain_find_torch want_cuda)
  set(MPITRAIN_TORCH_CUDA OFF)
  set(MPITRAIN_TORCH_WHY "")
  if(NOT ${want_cuda})
    set(MPITRAIN_TORCH_WHY "CUDA not wanted (MPITRAIN_WITH_CUDA=OFF)")
  elseif(NOT CMAKE_CUDA_COMPILER)
    # The places torch's FindCUDA looks for nvcc, checked without caching the answer so that a
    # toolkit removed or installed later is seen by the next configure.
    find_program(_mpitrain_nvcc nvcc NO_CACHE
                 HINTS "${CUDAToolkit_ROOT}" "${CUDA_TOOLKIT_ROOT_DIR}" ENV CUDAToolkit_ROOT
                       ENV CUDA_HOME ENV CUDA_PATH
                 PATH_SUFFIXES bin
                 PATHS /usr/local/cuda/bin)
    if(NOT _mpitrain_nvcc)
      set(MPITRAIN_TORCH_WHY "no CUDA toolkit (nvcc not on PATH, in CUDA_HOME or /usr/local/cuda)")
    endif()
  endif()
  if(MPITRAIN_TORCH_WHY AND NOT TARGET torch::cudart)
    add_library(torch::cudart INTERFACE IMPORTED)
  endif()

  find_package(Torch REQUIRED)
  if(NOT MPITRAIN_TORCH_WHY)
    if(TARGET torch_cuda AND CUDAToolkit_FOUND)
      set(MPITRAIN_TORCH_CUDA ON)
    else()
      set(MPITRAIN_TORCH_WHY "torch or the CUDA toolkit has no CUDA support")
    endif()
  endif()

  # torch's CMake prefix is <site-packages>/torch/share/cmake/Torch.
  get_filename_component(_mpitrain_site "${Torch_DIR}/../../../.." ABSOLUTE)
  set(MPITRAIN_TORCH_RPATH "${_mpitrain_site}/torch/lib")
  file(GLOB _mpitrain_wheel_libs "${_mpitrain_site}/nvidia/*/lib/libcudart.so.*"
                                 "${_mpitrain_site}/nvidia/*/lib/libnccl.so.*")
  foreach(_lib IN LISTS _mpitrain_wheel_libs)
    get_filename_component(_dir "${_lib}" DIRECTORY)
    list(APPEND MPITRAIN_TORCH_RPATH "${_dir}")
  endforeach()
  list(REMOVE_DUPLICATES MPITRAIN_TORCH_RPATH)
endmacro()
