"""The pretext objective: patch masks (`masking`) and the MPC / MPG losses (`losses`)."""
