# Installs the library as the package `mpitrain` with the target mpitrain::mpitrain, so a user's
# project can do find_package(mpitrain) and link it (docs/building.md).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS mpitrain mpitrain_warnings EXPORT mpitrainTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/mpitrain DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT mpitrainTargets NAMESPACE mpitrain:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/mpitrain)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/mpitrainConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/mpitrainConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/mpitrain)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/mpitrainConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/mpitrainConfig.cmake ${PROJECT_BINARY_DIR}/mpitrainConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/mpitrain)
