# KTO (variant "kto") in plain Elixir, no dependencies: reads the exported cases (.npz = a zip of .npy files),
# computes the loss and dL/dpolicy_logps by hand (z_ref detached, so dL/dkl_policy_logps = 0), and writes a
# kto_np-oracle-results file for `kto-np oracle compare`.
# Run: elixir kto_results.exs CASES_DIR RESULTS.json

defmodule Npy do
  # One .npy: magic, version 1.0 (2-byte header length) or 2.0/3.0 (4-byte), a Python-dict header, the data.
  def parse(<<0x93, "NUMPY", major, _minor, rest::binary>>) do
    {header, data} =
      if major == 1 do
        <<len::little-16, header::binary-size(len), data::binary>> = rest
        {header, data}
      else
        <<len::little-32, header::binary-size(len), data::binary>> = rest
        {header, data}
      end

    [_, descr] = Regex.run(~r/'descr': '([^']+)'/, header)
    values =
      case descr do
        "<f8" -> for <<x::little-float-64 <- data>>, do: x
        "|b1" -> for <<x::8 <- data>>, do: x == 1
        "<i8" -> for <<x::little-signed-64 <- data>>, do: x
      end

    if Regex.match?(~r/'shape': \(\)/, header), do: hd(values), else: values
  end

  # An .npz is a zip of .npy files, stored (not compressed), with zip64 sizes in the local headers (NumPy's
  # writer): walk the local file headers up to the central directory.
  def load_npz(path) do
    path |> File.read!() |> entries() |> Map.new(fn {name, bin} -> {String.replace_suffix(name, ".npy", ""), parse(bin)} end)
  end

  defp entries(<<0x50, 0x4B, 3, 4, _version::16, _flags::16, 0::little-16, _time_date::32, _crc::32,
                 size::little-32, _uncompressed::32, name_length::little-16, extra_length::little-16,
                 name::binary-size(name_length), extra::binary-size(extra_length), rest::binary>>) do
    size = if size == 0xFFFFFFFF, do: zip64_size(extra), else: size
    <<data::binary-size(size), rest::binary>> = rest
    [{name, data} | entries(rest)]
  end

  defp entries(_central_directory), do: []

  defp zip64_size(<<1::little-16, _length::little-16, _uncompressed::little-64, compressed::little-64, _::binary>>),
    do: compressed
end

defmodule KTO do
  def sigmoid(x) when x >= 0, do: 1.0 / (1.0 + :math.exp(-x))
  def sigmoid(x), do: :math.exp(x) / (1.0 + :math.exp(x))

  # loss = mean_i l_i; desirable l_i = w_D (1 - s(beta (r_i - z))), undesirable l_i = w_U (1 - s(beta (z - r_i)))
  def loss_and_grad(x) do
    beta = x["inputs/beta"]
    {w_d, w_u} = {x["inputs/desirable_weight"], x["inputs/undesirable_weight"]}
    r = Enum.zip_with(x["inputs/policy_logps"], x["inputs/ref_logps"], &(&1 - &2))
    n = length(r)

    z =
      case x["inputs/kl_policy_logps"] do
        nil -> 0.0
        kl -> max(0.0, Enum.sum(Enum.zip_with(kl, x["inputs/kl_ref_logps"], &(&1 - &2))) / length(kl))
      end

    terms =
      Enum.zip_with(r, x["inputs/labels"], fn r_i, desirable ->
        if desirable do
          s = sigmoid(beta * (r_i - z))
          {w_d * (1 - s), -w_d * beta * s * (1 - s) / n}
        else
          s = sigmoid(beta * (z - r_i))
          {w_u * (1 - s), w_u * beta * s * (1 - s) / n}
        end
      end)

    {Enum.sum(Enum.map(terms, &elem(&1, 0))) / n, Enum.map(terms, &elem(&1, 1)), x["inputs/kl_policy_logps"]}
  end
end

defmodule Json do
  def encode(x) when is_float(x), do: Float.to_string(x)
  def encode(x) when is_integer(x), do: Integer.to_string(x)
  def encode(x) when is_binary(x), do: "\"" <> x <> "\""
  def encode(x) when is_list(x), do: "[" <> Enum.map_join(x, ",", &encode/1) <> "]"
  def encode(x) when is_map(x), do: "{" <> Enum.map_join(x, ",", fn {k, v} -> encode(k) <> ":" <> encode(v) end) <> "}"
end

[cases_dir, out] = System.argv()

results =
  for file <- Path.wildcard(Path.join(cases_dir, "kto_loss-kto-*.npz")), into: %{} do
    name = file |> Path.basename(".npz") |> String.replace("-", "/", global: true)
    {loss, grad, kl} = KTO.loss_and_grad(Npy.load_npz(file))
    grads = if kl, do: %{"policy_logps" => grad, "kl_policy_logps" => Enum.map(kl, fn _ -> 0.0 end)},
                   else: %{"policy_logps" => grad}
    {name, %{"loss" => loss, "grad" => grads}}
  end

File.write!(out, Json.encode(%{"format" => "kto_np-oracle-results", "version" => 1, "kind" => "kto_loss",
                                "variant" => "kto", "results" => results}))
IO.puts("wrote #{map_size(results)} cases to #{out}")
