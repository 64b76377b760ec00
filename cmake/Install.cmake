# Installs the library as the package `mpitrain` with the target mpitrain::mpitrain, so a user's
# project can do find_package(mpitrain) and link it (docs/building.md), plus the programs train,
# h5shard, generate and convert_weights. tests/package installs a build and builds
# examples/custom_model against it.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# mpitrain is a static library: its private dependencies (HDF5, zlib) and the INTERFACE target
# carrying our warning (and sanitizer, cmake/Sanitize.cmake) flags are part of its link
# interface, so they are exported too, and mpitrainConfig.cmake finds them again.
install(TARGETS mpitrain mpitrain_warnings mpitrain_sanitize EXPORT mpitrainTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# The API only: the headers under include/ (internal units live in src/), and the CUDA/NCCL
# check macros only where the CUDA path is built.
if(MPITRAIN_HAVE_CUDA)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/mpitrain DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
else()
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/mpitrain DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
          PATTERN cuda_check.h EXCLUDE)
endif()
install(EXPORT mpitrainTargets NAMESPACE mpitrain:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/mpitrain)

# The programs. LibTorch, NCCL and the CUDA runtime are shared libraries in the torch wheel's
# folders, outside any system path: the installed programs keep the run path to them (the link
# folders, and the wheel's folders in CMAKE_INSTALL_RPATH, cmake/mpitrainTorch.cmake).
set_target_properties(train h5shard generate convert_weights PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON)
install(TARGETS train h5shard generate convert_weights RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/mpitrainConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/mpitrainConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/mpitrain)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/mpitrainConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/mpitrainConfig.cmake ${PROJECT_BINARY_DIR}/mpitrainConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/mpitrainTorch.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/mpitrain)
