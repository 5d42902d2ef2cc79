# ctest: the CUDA kernels' PTX has what csrc/cuda/active_step.cuh promises. Run as
#   cmake -DPTX="a.ptx|b.ptx" -P check_ptx.cmake
# * no float32 FMA: --fmad=false keeps the CPU kernels' roundings (float64 is not checked: the
#   device pow of the per-tensor scalars uses fma.rn.f64 on purpose);
# * IEEE-rounded float division and square root, never the approximate instructions;
# * 16-byte vector loads and stores (ld/st.global.v4.f32) on the aligned path.
string(REPLACE "|" ";" files "${PTX}")
if(NOT files)
  message(FATAL_ERROR "no PTX files given")
endif()
foreach(file IN LISTS files)
  file(READ "${file}" ptx)
  foreach(forbidden "fma\\.rn\\.f32" "div\\.(approx|full)\\.f32" "sqrt\\.approx\\.f32")
    if(ptx MATCHES "${forbidden}")
      message(FATAL_ERROR "${file}: contains ${CMAKE_MATCH_0}")
    endif()
  endforeach()
  foreach(required "ld\\.global\\.v4\\.f32" "st\\.global\\.v4\\.f32" "div\\.rn\\.f32")
    if(NOT ptx MATCHES "${required}")
      message(FATAL_ERROR "${file}: no ${required}")
    endif()
  endforeach()
  message(STATUS "${file}: ok")
endforeach()
