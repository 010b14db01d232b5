"""GPU flavor of ct_preprocess: the DALI backend autoserializes this pipeline when it loads the model.

The graph is medseg's one preprocessing definition; the CPU flavor runs the same graph on the CPU.
"""

from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

from medseg.ops.dali_pipeline import ct_preprocess_graph
from medseg.ops.preprocess import GPU_THREADS
from medseg_client.spec import SPEC


@autoserialize
@pipeline_def(batch_size=SPEC.max_batch_size, num_threads=GPU_THREADS, device_id=0)
def pipeline():
    return ct_preprocess_graph(device="gpu")
