# apo_fast_triton_aot(OUT_DIR <dir> ARCHS <80;90> OUTPUTS <var>)
#
# Adds the build step that compiles the Triton kernels ahead of time with
# `python -m apo_fast.aot.library` and sets <var> to the generated C sources.
# The interpreter is FindPython3's (an active virtual environment first;
# override with -DPython3_EXECUTABLE=...). It must import triton and an
# installed apo-fast (pip install -e .). Compilation needs no GPU; Triton's
# on-disk cache (~/.triton/cache, or TRITON_CACHE_DIR) makes rebuilds fast.
# APO_FAST_KERNELS_AOT_JOBS sets the number of compile processes.

find_package(Python3 REQUIRED COMPONENTS Interpreter)

function(_apo_fast_check_python)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import os; os.environ['TRITON_INTERPRET'] = '0'; import triton, apo_fast.aot.library, apo_fast.kernels.apo_loss as k; print(triton.__version__ + ';' + os.path.dirname(os.path.dirname(os.path.realpath(k.__file__))))"
    WORKING_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}"
    RESULT_VARIABLE result
    OUTPUT_VARIABLE probe
    ERROR_VARIABLE error
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR
      "apo_fast_kernels: ${Python3_EXECUTABLE} cannot import triton and apo_fast.aot.library.\n"
      "Install the project into that interpreter (pip install -e .) or point CMake at one that has it "
      "with -DPython3_EXECUTABLE=/path/to/venv/bin/python.\n${error}")
  endif()
  list(GET probe 0 triton_version)
  list(GET probe 1 kernels_root)
  message(STATUS "apo_fast_kernels: Triton ${triton_version} via ${Python3_EXECUTABLE}")
  get_filename_component(source_root "${PROJECT_SOURCE_DIR}" REALPATH)
  if(NOT kernels_root STREQUAL source_root)
    message(WARNING "apo_fast_kernels: ${Python3_EXECUTABLE} imports the kernels from ${kernels_root}, "
      "not from this source tree (${source_root}); the library gets those. Use an editable install "
      "(pip install -e .) of this tree.")
  endif()
endfunction()

function(apo_fast_triton_aot)
  cmake_parse_arguments(AOT "" "OUT_DIR;OUTPUTS" "ARCHS" ${ARGN})
  if(NOT AOT_OUT_DIR OR NOT AOT_OUTPUTS OR NOT AOT_ARCHS)
    message(FATAL_ERROR "apo_fast_triton_aot: OUT_DIR, ARCHS and OUTPUTS are required")
  endif()
  foreach(arch IN LISTS AOT_ARCHS)
    if(NOT arch MATCHES "^(80|90)$")
      message(FATAL_ERROR "apo_fast_triton_aot: unsupported arch '${arch}' (use 80 and/or 90)")
    endif()
  endforeach()
  _apo_fast_check_python()

  if(NOT DEFINED APO_FAST_KERNELS_AOT_JOBS)
    include(ProcessorCount)
    ProcessorCount(cores)
    if(cores LESS 1)
      set(cores 1)
    endif()
    set(APO_FAST_KERNELS_AOT_JOBS ${cores})
  endif()

  string(REPLACE ";" "," archs "${AOT_ARCHS}")
  set(src "${PROJECT_SOURCE_DIR}")
  file(GLOB kernel_sources CONFIGURE_DEPENDS "${src}/kernels/*.py")
  # the generator and the host constants it reads (tile sizes, rank padding)
  file(GLOB host_sources CONFIGURE_DEPENDS "${src}/apo_fast/aot/*.py" "${src}/apo_fast/ops/apo_loss/*.py"
       "${src}/apo_fast/ops/gated_lora/*.py")
  set(outputs
    "${AOT_OUT_DIR}/apo_fast_kernels_cubins.c"
    "${AOT_OUT_DIR}/apo_fast_kernels_args.h"
    "${AOT_OUT_DIR}/apo_fast_kernels_manifest.json")
  add_custom_command(
    OUTPUT ${outputs}
    COMMAND "${CMAKE_COMMAND}" -E env TRITON_INTERPRET=0 TRITON_DISABLE_LINE_INFO=1 TRITON_DEFAULT_FP_FUSION=1
      "${Python3_EXECUTABLE}" -m apo_fast.aot.library
      --out-dir "${AOT_OUT_DIR}" --archs "${archs}" --jobs ${APO_FAST_KERNELS_AOT_JOBS}
    DEPENDS
      ${kernel_sources}
      ${host_sources}
    WORKING_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}"
    COMMENT "Compiling the Triton kernels ahead of time for archs ${archs} (python -m apo_fast.aot.library)"
    VERBATIM)
  # The header too, so every source of the target waits for the generator.
  set(${AOT_OUTPUTS} "${AOT_OUT_DIR}/apo_fast_kernels_cubins.c" "${AOT_OUT_DIR}/apo_fast_kernels_args.h" PARENT_SCOPE)
endfunction()
