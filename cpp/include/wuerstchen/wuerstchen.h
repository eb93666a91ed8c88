/* Würstchen v2 text-to-image from an exported bundle, in C (callable from C++, Go, Rust, C#, ...).
 *
 *   wuerstchen_options options;  wuerstchen_default_options(&options);
 *   wuerstchen_engine* engine = wuerstchen_create("tiny-bundle", &options);
 *   if (wuerstchen_last_error(engine)) { puts(wuerstchen_last_error(engine)); }
 *   wuerstchen_request request;  wuerstchen_default_request(&request);
 *   request.prompt = "a photo of a corgi";  request.height = request.width = 256;  request.seed = 0;
 *   uint8_t* rgb = malloc(256 * 256 * 3);
 *   if (wuerstchen_generate(engine, &request, rgb, 256 * 256 * 3) != 0) puts(wuerstchen_last_error(engine));
 *   wuerstchen_destroy(engine);
 *
 * Errors are one-line strings that name the field, the value and what was expected; no call aborts the
 * process on bad input. An engine is safe to use from one thread at a time. */
#ifndef WUERSTCHEN_H
#define WUERSTCHEN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define WUERSTCHEN_API __declspec(dllexport)
#else
#define WUERSTCHEN_API __attribute__((visibility("default")))
#endif

typedef struct wuerstchen_engine wuerstchen_engine;

typedef struct {
  const char* provider; /* "cpu" (default), "cuda" or "tensorrt" (builds linked to onnxruntime-gpu) */
  int device_id;        /* the GPU for cuda and tensorrt */
  int threads;          /* ONNX Runtime intra-op threads; 0 lets it choose */
  int check_hashes;     /* non-zero (default): verify every bundle file's SHA-256 at creation */
} wuerstchen_options;

typedef struct {
  const char* prompt;          /* UTF-8 */
  const char* negative_prompt; /* UTF-8; NULL or "" for none */
  int height, width;           /* pixels, on the bundle's grid; 0 for the bundle's default size */
  int prior_steps;             /* 0: the published 29-evaluation prior schedule */
  int decoder_steps;           /* 0: the bundle's default (12) */
  float prior_guidance;        /* negative: the bundle's default (4); guidance is on above 1 */
  float decoder_guidance;      /* negative: the bundle's default (0) */
  uint64_t seed;               /* the same seed gives the image `wuerstchen generate --seed` makes */
} wuerstchen_request;

WUERSTCHEN_API void wuerstchen_default_options(wuerstchen_options* options);
WUERSTCHEN_API void wuerstchen_default_request(wuerstchen_request* request);

/* Loads and checks a bundle folder. Returns NULL only when out of memory; when loading failed, the
 * engine's last error says why and every generate call fails. */
WUERSTCHEN_API wuerstchen_engine* wuerstchen_create(const char* bundle_folder, const wuerstchen_options* options);

/* Makes one image into `rgb`: height × width × 3 bytes, row-major, the caller's buffer of `rgb_size`
 * bytes. Returns 0 on success, non-zero on error (then see wuerstchen_last_error). */
WUERSTCHEN_API int wuerstchen_generate(wuerstchen_engine* engine, const wuerstchen_request* request, uint8_t* rgb,
                                       size_t rgb_size);

/* The same image as floats in [0, 1] (height × width × 3), before rounding to bytes. */
WUERSTCHEN_API int wuerstchen_generate_float(wuerstchen_engine* engine, const wuerstchen_request* request, float* rgb,
                                             size_t rgb_count);

/* The last error of this engine as a one-line string, or NULL after a success. Valid until the next call. */
WUERSTCHEN_API const char* wuerstchen_last_error(const wuerstchen_engine* engine);

WUERSTCHEN_API void wuerstchen_destroy(wuerstchen_engine* engine);

#ifdef __cplusplus
}
#endif

#endif /* WUERSTCHEN_H */
