/* Test controls of the fake CUDA driver (fake_cuda.c). */
#ifndef APO_FK_FAKE_CUDA_H
#define APO_FK_FAKE_CUDA_H

#ifdef __cplusplus
extern "C" {
#endif

#define FAKE_CUDA_NAME_MAX 128
#define FAKE_CUDA_MAX_PARAMS 64
#define FAKE_CUDA_PARAM_BYTES 1024

/* One recorded cuLaunchKernel. params holds the parameter values laid out as
 * the kernel reads them (parameter i: sizes[i] bytes at offsets[i]). */
typedef struct fake_cuda_launch {
    char function[FAKE_CUDA_NAME_MAX];
    int arch;          /* SM version of the cubin the function came from */
    const void *image; /* the image given to cuModuleLoadData */
    unsigned grid[3], block[3], shared_bytes;
    void *stream, *context;
    int n_params;
    unsigned offsets[FAKE_CUDA_MAX_PARAMS], sizes[FAKE_CUDA_MAX_PARAMS];
    unsigned char params[FAKE_CUDA_PARAM_BYTES];
} fake_cuda_launch;

/* The device every context reports, and the current context (0: none). */
void fake_cuda_configure(int cc_major, int cc_minor, int sm_count, int shared_optin, int context_id);
void fake_cuda_reset_launches(void);
int fake_cuda_launch_count(void);
int fake_cuda_launch_get(int index, fake_cuda_launch *out);
int fake_cuda_modules_loaded(void); /* loaded minus unloaded */

#ifdef __cplusplus
}
#endif

#endif
