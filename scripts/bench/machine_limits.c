// The machine's ceilings for the speed goals: peak f32 FMA throughput (prefill/perplexity are
// compute-bound) and streaming read bandwidth (decoding streams every weight once per token),
// with 1 and 2 threads. See docs/benchmarks.md.
//
//   gcc -O3 -funroll-loops -fopenmp -o /tmp/machine_limits scripts/bench/machine_limits.c
//   /tmp/machine_limits
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
__attribute__((target("avx2,fma"))) static float fma_loop(long iters){
  __m256 a[10]; __m256 b=_mm256_set1_ps(1.0000001f), c=_mm256_set1_ps(1e-7f);
  for(int i=0;i<10;i++) a[i]=_mm256_set1_ps(i);
  for(long n=0;n<iters;n++) for(int i=0;i<10;i++) a[i]=_mm256_fmadd_ps(a[i],b,c);
  __m256 s=a[0]; for(int i=1;i<10;i++) s=_mm256_add_ps(s,a[i]);
  float o[8]; _mm256_storeu_ps(o,s); return o[0];
}
__attribute__((target("avx2"))) static double sum(const float* p, size_t n){
  __m256 s0=_mm256_setzero_ps(),s1=s0,s2=s0,s3=s0;
  for(size_t i=0;i<n;i+=32){s0=_mm256_add_ps(s0,_mm256_load_ps(p+i));s1=_mm256_add_ps(s1,_mm256_load_ps(p+i+8));
    s2=_mm256_add_ps(s2,_mm256_load_ps(p+i+16));s3=_mm256_add_ps(s3,_mm256_load_ps(p+i+24));}
  s0=_mm256_add_ps(_mm256_add_ps(s0,s1),_mm256_add_ps(s2,s3)); float o[8]; _mm256_storeu_ps(o,s0); return o[0];
}
int main(){
  for(int th=1;th<=2;th++){
    omp_set_num_threads(th);
    long iters=200000000; double best=1e9; volatile float sink=0;
    for(int r=0;r<3;r++){double t=now();
      #pragma omp parallel
      { float v=fma_loop(iters/ (th)); 
        #pragma omp atomic
        sink+=v; }
      double e=now()-t; if(e<best)best=e;}
    printf("threads %d: FMA peak %.1f GFLOP/s\n",th, (double)iters*10*8*2/best/1e9);
    size_t n=(size_t)1<<28; float* p=aligned_alloc(64,n*4); for(size_t i=0;i<n;i++)p[i]=1;
    best=1e9; double acc=0;
    for(int r=0;r<5;r++){double t=now();
      #pragma omp parallel reduction(+:acc)
      { int id=omp_get_thread_num(); size_t chunk=n/th; acc+=sum(p+id*chunk,chunk);}
      double e=now()-t; if(e<best)best=e;}
    printf("threads %d: read bandwidth %.1f GB/s (%.0f)\n",th,(double)n*4/best/1e9,acc);
    free(p);
  }
}
