# Included by CMakeLists.txt: one ctest per bad argument or bad bundle given to the sample program.
set(WUERSTCHEN_BUNDLE "" CACHE PATH "an exported bundle (wuerstchen export) for the sample's bad-bundle tests")

function(sample_error name expect)
  cmake_parse_arguments(PARSE_ARGV 2 opt "" "MUTATE" "ARGS")
  string(REPLACE ";" "|" args "${opt_ARGS}")  # a list cannot cross -D intact; expect_error.cmake splits it again
  add_test(NAME sample_error_${name}
           COMMAND ${CMAKE_COMMAND} -DSAMPLE=$<TARGET_FILE:wuerstchen-cpp> "-DARGS=${args}" "-DEXPECT=${expect}"
                   -DMUTATE=${opt_MUTATE} -DBUNDLE=${WUERSTCHEN_BUNDLE} -DWORK=${CMAKE_BINARY_DIR}/bad-bundles/${name}
                   -P ${CMAKE_CURRENT_SOURCE_DIR}/tests/expect_error.cmake)
endfunction()

sample_error(no_arguments "expected one PROMPT")
sample_error(unknown_flag "--colour: unknown flag" ARGS "a cat" --colour red --bundle x --out y.png)
sample_error(bad_height "--height=abc: expected an integer" ARGS "a cat" --bundle x --out y.png --height abc)
sample_error(negative_steps "--decoder-steps=-3: expected a positive integer" ARGS "a cat" --bundle x --out y.png --decoder-steps -3)
sample_error(missing_out "--out is missing" ARGS "a cat" --bundle x)
sample_error(no_bundle "folder does not exist" ARGS "a cat" --bundle ${CMAKE_BINARY_DIR}/no-such-bundle --out y.png)
sample_error(negative_guidance "--decoder-guidance=-2: expected 0 or more" ARGS "a cat" --bundle x --out y.png --decoder-guidance -2)
sample_error(bad_provider "provider=\"gpu\": expected cpu, cuda or tensorrt" ARGS "a cat" --bundle x --out y.png --provider gpu)
if(WUERSTCHEN_BUNDLE)
  set(out ${CMAKE_BINARY_DIR}/bad.png)
  sample_error(size_outside "height=4096 is outside the sizes this bundle serves" ARGS "a cat" --bundle ${WUERSTCHEN_BUNDLE} --out ${out} --height 4096 --width 128)
  sample_error(size_off_grid "width=200 is off the model's size grid" ARGS "a cat" --bundle ${WUERSTCHEN_BUNDLE} --out ${out} --height 128 --width 200)
  sample_error(unwritable_out "cannot be written" ARGS "a cat" --bundle ${WUERSTCHEN_BUNDLE} --out ${CMAKE_BINARY_DIR}/no/such/dir.png --height 128 --width 128 --prior-steps 1 --decoder-steps 1)
  sample_error(format_version "format_version=2 is not supported" MUTATE format_version ARGS "a cat" --out ${out})
  sample_error(altered_file "prior_step.onnx was altered" MUTATE altered ARGS "a cat" --out ${out})
  sample_error(missing_file "vqgan_decode.onnx is missing" MUTATE missing ARGS "a cat" --out ${out})
  sample_error(path_outside "leaves the bundle" MUTATE outside ARGS "a cat" --out ${out})
  sample_error(symlink_out "lies outside the bundle" MUTATE symlink ARGS "a cat" --out ${out})
  sample_error(invalid_json "is not valid JSON" MUTATE json ARGS "a cat" --out ${out})
  sample_error(dim_zero "shape\\[2\\] is \"0\\*ph\", expected a size from 1" MUTATE dim_zero ARGS "a cat" --out ${out})
  sample_error(latent_scale "vqgan_decode made images of shape \\[1, 3, 192, 192\\], expected \\[1, 3, 128, 128\\]" MUTATE latent_scale
               ARGS "a cat" --out ${out} --height 128 --width 128 --prior-steps 1 --decoder-steps 1)
endif()
