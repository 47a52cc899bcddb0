{{/* Names and labels. */}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "ferry.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "ferry.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ferry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ferry.configMapName" -}}
{{- default (printf "%s-config" (include "ferry.fullname" .)) .Values.existingConfigMap }}
{{- end }}

{{/* The admin port, from `[admin] listen` (ferry's default 0.0.0.0:8080). */}}
{{- define "ferry.adminPort" -}}
{{- $admin := default dict (.Values.config).admin }}
{{- $listen := default "0.0.0.0:8080" $admin.listen | toString }}
{{- $port := regexFind "[0-9]+$" $listen }}
{{- if not $port }}
{{- fail (printf "config.admin.listen: %q is not an address like 0.0.0.0:8080" $listen) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
Seconds (rounded up) in a duration string as ferry reads it ("500ms", "30s", "1m 30s").
*/}}
{{- define "ferry.seconds" -}}
{{- $text := toString . }}
{{- $ms := 0 }}
{{- $parts := regexFindAll "[0-9]+ *(ms|min|m|sec|s|hr|h|d)" $text -1 }}
{{- if not $parts }}
{{- fail (printf "shutdown_grace: %q is not a duration such as \"30s\"" $text) }}
{{- end }}
{{- range $parts }}
{{- $n := regexFind "^[0-9]+" . | int }}
{{- $unit := regexReplaceAll "^[0-9]+ *" . "" }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if or (eq $unit "s") (eq $unit "sec") }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if or (eq $unit "m") (eq $unit "min") }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if or (eq $unit "h") (eq $unit "hr") }}{{ $ms = add $ms (mul $n 3600000) }}
{{- else }}{{ $ms = add $ms (mul $n 86400000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/* The longest shutdown_grace over every route of `config` and its layers (default 30s). */}}
{{- define "ferry.shutdownGraceSeconds" -}}
{{- if .Values.existingConfigMap }}
{{- .Values.shutdownGraceSeconds | int }}
{{- else }}
{{- $configs := list .Values.config }}
{{- range $env, $layer := .Values.layers }}
{{- $configs = append $configs (default dict $layer.config) }}
{{- range $scope, $c := (default dict $layer.scopes) }}
{{- $configs = append $configs $c }}
{{- end }}
{{- end }}
{{- $max := 0 }}
{{- range $configs }}
{{- range $name, $route := (default dict .routes) }}
{{- $grace := 30 }}
{{- with (default dict $route).delivery }}
{{- with .shutdown_grace }}
{{- $grace = include "ferry.seconds" . | int }}
{{- end }}
{{- end }}
{{- if gt $grace $max }}{{ $max = $grace }}{{ end }}
{{- end }}
{{- end }}
{{- if eq $max 0 }}{{ $max = 30 }}{{ end }}
{{- $max }}
{{- end }}
{{- end }}

{{/* A map rendered as YAML whose values are all strings (KEDA rejects numbers and booleans). */}}
{{- define "ferry.stringMap" -}}
{{- range $k, $v := . }}
{{- if not (kindIs "invalid" $v) }}
{{ $k }}: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end }}
