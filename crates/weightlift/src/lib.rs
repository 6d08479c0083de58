//! weightlift: fast safetensors checkpoint loading.
